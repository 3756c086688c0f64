"""Request and response bodies of the HTTP API (docs/api.md); unknown request fields are rejected."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from heads.sampling import FinishReason, SamplingParams

HEAD_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# The name of the base's own linear head wherever a head is named: /v1 `model`, metric labels, comparisons.
# Never a head's name in practice: uploads under it are refused (server/registry.py).
BASE_LABEL = "base"
DEFAULT_MAX_NEW_TOKENS = 64
COMPARE_ALL = ("greedy", "top_k")

HeadName = Annotated[str, Field(pattern=HEAD_NAME_PATTERN, description="[a-z0-9][a-z0-9._-]{0,63}")]
# Bounds shared by /generate and /v1, so a client gets the same limits on both routes. The character
# cap only stops absurd bodies early; the real limit is MAX_PROMPT_TOKENS after formatting.
MAX_PROMPT_CHARS = 100_000  # also the most token ids in one prompt
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_TOP_LOGPROBS = 5  # alternatives per token: /generate's `top_logprobs`, /v1's `logprobs` (OpenAI's limit)
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
MAX_BEAMS = 8  # beams of one "beam" request: each is a sequence of the batch (MAX_BATCH_SIZE counts them)
MAX_LENGTH_PENALTY = 10.0  # |length_penalty|: beyond it, length alone decides
BEAM_FIELDS = ("num_beams", "length_penalty", "early_stopping")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Decoding(Strict):
    strategy: Literal["greedy", "top_k", "top_p", "beam"] = "greedy"
    top_k: int = Field(default=50, ge=1, le=1000)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)  # None: a fresh random seed per request
    # Beam search (server/beams.py), with transformers' meaning of each field; 1 beam is greedy, as there.
    num_beams: int = Field(default=4, ge=1, le=MAX_BEAMS)
    length_penalty: float = Field(default=1.0, ge=-MAX_LENGTH_PENALTY, le=MAX_LENGTH_PENALTY, allow_inf_nan=False)
    early_stopping: bool | Literal["never"] = False

    @model_validator(mode="after")
    def _beam_fields_need_beam(self) -> Decoding:
        given = [name for name in BEAM_FIELDS if name in self.model_fields_set]
        if given and self.strategy != "beam":
            raise ValueError(f"{', '.join(given)}: only for strategy 'beam' (got strategy {self.strategy!r})")
        return self

    def params(self) -> SamplingParams:
        """The engine's settings; one beam is greedy decoding, as transformers' generate makes it. `top_k` and
        `temperature` stay for the linear_top_k comparison whatever the strategy."""
        beam = self.strategy == "beam" and self.num_beams > 1
        return SamplingParams(strategy="greedy" if self.strategy == "beam" and not beam else self.strategy,
                              top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
                              num_beams=self.num_beams if beam else 1, length_penalty=self.length_penalty,
                              early_stopping=self.early_stopping)


class GenerateRequest(Strict):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    head: HeadName | None = None
    # The upper bound is the MAX_NEW_TOKENS setting, checked by the route; left out, it is 64 or the setting if lower.
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1)
    decoding: Decoding = Field(default_factory=Decoding)
    stop: list[StopString] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    compare: bool | list[Literal["greedy", "top_k"]] = False
    raw: bool = False
    return_logprobs: bool = False
    # The most likely alternatives per token (each decoder's stream events, and `logprobs` with return_logprobs).
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    ignore_eos: bool = False  # keep going past the end-of-sequence token (benchmarks want fixed lengths)
    stream: bool = False  # answer with server-sent events, token by token (docs/api.md)

    @model_validator(mode="after")
    def _beam_is_not_streamed(self) -> GenerateRequest:
        if self.stream and self.decoding.strategy == "beam":
            raise ValueError("stream: beam search knows its answer only when it ends; send stream: false")
        return self

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be empty or only whitespace")
        return prompt

    def comparisons(self) -> list[str]:
        """The comparison decoders asked for, in order, without repeats."""
        if self.compare is True:
            return list(COMPARE_ALL)
        if self.compare is False:
            return []
        return list(dict.fromkeys(self.compare))


class Timings(BaseModel):
    queue_s: float  # accepted -> the worker started it
    first_token_s: float  # accepted -> first generated token
    total_s: float  # accepted -> done
    tokens_per_s: float  # generated tokens / time the worker spent on the request


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] | None = None  # the most likely tokens at this step, most likely first (top_logprobs)


class Comparison(BaseModel):
    decoder: str  # "linear_greedy" | "linear_top_k"
    text: str
    tokens: int
    finish_reason: FinishReason
    timings: Timings | None = None  # its own first token, last token and rate (same queue time as the answer)


class GenerateResponse(BaseModel):
    text: str
    tokens: int
    finish_reason: FinishReason
    head: str | None
    prompt: str
    timings: Timings
    logprobs: list[TokenLogprob] | None = None
    comparisons: list[Comparison] | None = None


class HeadSummary(BaseModel):
    name: str
    # "invalid": the folder cannot be served (bad files, or its logits failed the probe check);
    # "incompatible": a sound head made for another base (a registry shared by servers of different bases).
    # Either way `error` says why, requests for it get 409, and fields its config cannot tell are null.
    status: Literal["ready", "invalid", "incompatible"] = "ready"
    error: str | None = None
    type: str | None = None
    task: str | None = None
    bytes: int
    resident: bool
    prompt_template: str | None = None
    prompt_format: str | None = None  # "plain", or "chat": the filled template is the chat template's user message
    base_model_name_or_path: str | None = None
    base_fingerprint: str | None = None  # the base the head was made for
    served_base_fingerprint: str | None = None  # set when incompatible: the base this server serves
    created_at: str | None = None
    config: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    generative: bool | None = None  # it decodes text (/generate); false: a classifier (POST /classify only)
    # What POST /classify labels without label words: a classifier's labels, or a generative head's verbalizer
    # labels (its head_config.json `labels`); null: the head classifies only with label words, if at all.
    labels: list[str] | None = None


class HeadList(BaseModel):
    heads: list[HeadSummary]


class Status(BaseModel):
    status: str


class Limits(BaseModel):
    """The bounds this server holds requests to, so a client (the page's form) can respect them up front."""

    max_new_tokens: int
    max_prompt_tokens: int  # once formatted with the head's template
    max_stop_strings: int
    max_stop_chars: int
    max_top_logprobs: int


class Readiness(BaseModel):
    status: str
    base: str
    base_fingerprint: str
    device: str
    limits: Limits
    # The base formats chat (its tokenizer has a chat template): /v1/chat/completions works, and /generate without
    # a head puts the prompt in a user message, which ends at the end-of-turn token (no stop string needed).
    chat_template: bool = False
