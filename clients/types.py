"""Typed results mirroring the server's JSON responses (docs/api.md).

Parsing reads the documented fields and ignores any others, so a newer server that adds fields
does not break an older client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Timings:
    queue_s: float
    first_token_s: float | None  # None when no token was generated
    total_s: float
    tokens_per_s: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timings:
        first = data.get("first_token_s")
        return cls(queue_s=float(data.get("queue_s", 0.0)), first_token_s=None if first is None else float(first),
                   total_s=float(data.get("total_s", 0.0)), tokens_per_s=float(data.get("tokens_per_s", 0.0)))


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenLogprob:
        return cls(token_id=int(data["token_id"]), token=str(data["token"]), logprob=float(data["logprob"]))


@dataclass(frozen=True)
class Comparison:
    decoder: str  # "linear_greedy" | "linear_top_k"
    text: str
    tokens: int
    finish_reason: str
    timings: Timings | None = None  # its own first token, total and rate (servers before streaming sent none)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Comparison:
        timings = data.get("timings")
        return cls(decoder=str(data["decoder"]), text=str(data["text"]), tokens=int(data["tokens"]),
                   finish_reason=str(data["finish_reason"]),
                   timings=None if timings is None else Timings.from_json(timings))


@dataclass(frozen=True)
class StreamToken:
    """One token of a streamed generation, as soon as the server decides it."""

    decoder: str  # "main" for the answer, else "linear_greedy" | "linear_top_k"
    token_id: int
    token: str  # the token on its own
    text: str  # the text it makes final (empty while a partial character or possible stop string is held back)
    logprob: float
    finish_reason: str | None  # set on the decoder's last token

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamToken:
        reason = data.get("finish_reason")
        return cls(decoder=str(data["decoder"]), token_id=int(data["token_id"]), token=str(data["token"]),
                   text=str(data["text"]), logprob=float(data["logprob"]),
                   finish_reason=None if reason is None else str(reason))


@dataclass(frozen=True)
class GenerateResult:
    text: str
    tokens: int  # number of generated tokens
    finish_reason: str  # "length" | "eos" | "stop"
    head: str | None  # None: the base's own linear LM head
    prompt: str  # the text actually fed to the model
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # only with return_logprobs
    comparisons: list[Comparison] | None = None  # only with compare

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateResult:
        logprobs, comparisons = data.get("logprobs"), data.get("comparisons")
        return cls(
            text=str(data["text"]), tokens=int(data["tokens"]), finish_reason=str(data["finish_reason"]),
            head=data.get("head"), prompt=str(data.get("prompt", "")), timings=Timings.from_json(data["timings"]),
            logprobs=None if logprobs is None else [TokenLogprob.from_json(x) for x in logprobs],
            comparisons=None if comparisons is None else [Comparison.from_json(x) for x in comparisons])


@dataclass(frozen=True)
class HeadSummary:
    name: str
    type: str  # head_type, e.g. "backward_attention" or "linear"
    task: str
    bytes: int  # size of the head's files on disk
    resident: bool  # loaded in the server's device cache right now
    prompt_template: str
    base_model_name_or_path: str | None
    base_fingerprint: str | None
    created_at: str | None
    config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # includes "final_metrics"
    # "invalid": the server cannot serve it; "incompatible": made for another base. Requests for either get
    # 409; `error` says why.
    status: str = "ready"
    error: str | None = None
    served_base_fingerprint: str | None = None  # set when incompatible: the base the server serves
    prompt_format: str = "plain"  # "chat": the server renders the filled template with the base's chat template
    generative: bool | None = None  # False: a classifier head (classify only); None: unknown (invalid, older server)
    labels: list[str] | None = None  # what classify() labels without label words (a classifier's or verbalizer's)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeadSummary:
        error, labels, generative = data.get("error"), data.get("labels"), data.get("generative")
        return cls(
            name=str(data["name"]), type=str(data.get("type") or ""), task=str(data.get("task") or ""),
            bytes=int(data.get("bytes") or 0), resident=bool(data.get("resident", False)),
            prompt_template=str(data.get("prompt_template") or ""),
            base_model_name_or_path=data.get("base_model_name_or_path"),
            base_fingerprint=data.get("base_fingerprint"), created_at=data.get("created_at"),
            config=dict(data.get("config") or {}), training=dict(data.get("training") or {}),
            status=str(data.get("status") or "ready"), error=None if error is None else str(error),
            served_base_fingerprint=data.get("served_base_fingerprint"),
            prompt_format=str(data.get("prompt_format") or "plain"),
            generative=None if generative is None else bool(generative),
            labels=None if labels is None else [str(label) for label in labels])


@dataclass(frozen=True)
class Readiness:
    status: str  # "ready"
    base: str
    base_fingerprint: str
    device: str
    chat_template: bool = False  # the base formats chat: /v1/chat/completions works

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Readiness:
        return cls(status=str(data.get("status", "")), base=str(data.get("base", "")),
                   base_fingerprint=str(data.get("base_fingerprint", "")), device=str(data.get("device", "")),
                   chat_template=bool(data.get("chat_template", False)))


@dataclass(frozen=True)
class Classification:
    """One text's labels: the most probable one, and every label's probability in label order."""

    label: str  # the most probable label
    probability: float  # its probability
    probabilities: dict[str, float]  # label -> probability, in the head's label order (not sorted)
    prompt: str  # the text as the base read it, formatted with the head's prompt template
    prompt_tokens: int
    queue_s: float  # accepted -> the engine step that scored it began
    total_s: float  # accepted -> scored
    truncated: bool = False  # its first tokens were dropped to fit the server's limit (classify(truncate=True))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Classification:
        timings = data.get("timings") or {}
        return cls(label=str(data["label"]), probability=float(data["probability"]),
                   probabilities={str(p["label"]): float(p["probability"]) for p in data["probabilities"]},
                   prompt=str(data.get("prompt", "")), prompt_tokens=int(data.get("prompt_tokens", 0)),
                   queue_s=float(timings.get("queue_s", 0.0)), total_s=float(timings.get("total_s", 0.0)),
                   truncated=bool(data.get("truncated", False)))


@dataclass(frozen=True)
class ClassifyResult:
    """`POST /classify`'s answer: one Classification per text, in the order sent."""

    head: str | None  # None: the base's own LM head (scored on label words)
    method: str  # "classifier" (a classifier head) | "verbalizer" (next-token logits on label tokens)
    labels: list[str]  # the label order of every result's probabilities
    results: list[Classification]
    label_token_ids: list[int] | None = None  # verbalizer: the token scored for each label

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassifyResult:
        ids = data.get("label_token_ids")
        return cls(head=data.get("head"), method=str(data.get("method", "")),
                   labels=[str(label) for label in data.get("labels", [])],
                   results=[Classification.from_json(r) for r in data["results"]],
                   label_token_ids=None if ids is None else [int(i) for i in ids])
