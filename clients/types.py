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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeadSummary:
        error = data.get("error")
        return cls(
            name=str(data["name"]), type=str(data.get("type") or ""), task=str(data.get("task") or ""),
            bytes=int(data.get("bytes") or 0), resident=bool(data.get("resident", False)),
            prompt_template=str(data.get("prompt_template") or ""),
            base_model_name_or_path=data.get("base_model_name_or_path"),
            base_fingerprint=data.get("base_fingerprint"), created_at=data.get("created_at"),
            config=dict(data.get("config") or {}), training=dict(data.get("training") or {}),
            status=str(data.get("status") or "ready"), error=None if error is None else str(error),
            served_base_fingerprint=data.get("served_base_fingerprint"),
            prompt_format=str(data.get("prompt_format") or "plain"))


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
