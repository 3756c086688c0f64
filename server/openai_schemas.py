"""Bodies of the OpenAI-compatible API (`/v1`), following OpenAI's legacy Completions API.

Fields OpenAI defines but we cannot honour (echo, best_of > 1, suffix, penalties, logit_bias,
n > 1) are accepted in their neutral form and rejected with a clear 422 otherwise, so a tool
never gets silently different behaviour. Fields OpenAI does not define are rejected.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag, model_validator

from server.schemas import MAX_PROMPT_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, StopString

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 32  # prompts in one request; each becomes a job of the same batch

TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


def _prompt_shape(prompt: Any) -> str:
    """OpenAI's reading of `prompt`, decided by its JSON shape alone: a list of strings is many prompts,
    a list of integers one tokenised prompt. Never by coercion, so `["12", "7"]` is never token ids."""
    if not isinstance(prompt, list):
        return "text"
    if prompt and isinstance(prompt[0], str):
        return "texts"
    if prompt and isinstance(prompt[0], list):
        return "token_id_lists"
    return "token_ids"


Prompt = Annotated[
    Annotated[PromptText, Tag("text")]
    | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS), Tag("texts")]
    | Annotated[TokenIds, Tag("token_ids")]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("token_id_lists")],
    Discriminator(_prompt_shape),
]
Stop = Annotated[
    Annotated[StopString, Tag("text")]
    | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS), Tag("list")],
    Discriminator(lambda stop: "list" if isinstance(stop, list) else "text"),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """What /v1/completions and /v1/chat/completions share: the model, the sampling knobs, and the fields
    OpenAI defines that we honour only in their neutral form (refused by name otherwise)."""

    model_config = ConfigDict(extra="forbid")
    choice_of: ClassVar[str]  # what one choice completes, for the message refusing n > 1

    model: str = Field(min_length=1, description='"base" or a head name (see GET /v1/models)')
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0: greedy; default 1")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, le=1000, description="extension, as in vLLM")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Stop | None = None  # the same bounds as /generate's (server.schemas)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, as a tracking id

    def _one_choice(self) -> tuple[bool, str]:
        return self.n != 1, f"n must be 1 (got {self.n}): one completion per {self.choice_of}"

    def _neutral_penalties(self) -> list[tuple[bool, str]]:
        return [(self.presence_penalty != 0.0 or self.frequency_penalty != 0.0,
                 "presence_penalty and frequency_penalty are not supported (must be 0)"),
                (bool(self.logit_bias), "logit_bias is not supported")]

    @staticmethod
    def _refuse(checks: list[tuple[bool, str]]) -> None:
        """The first unsupported setting, by name (a 422)."""
        for bad, message in checks:
            if bad:
                raise ValueError(message)


class CompletionRequest(OpenAIRequest):
    choice_of: ClassVar[str] = "prompt"

    prompt: Prompt
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        self._refuse([
            self._one_choice(),
            (self.best_of not in (None, 1), f"best_of must be 1 (got {self.best_of})"),
            (self.echo, "echo is not supported"),
            (self.suffix is not None, "suffix is not supported"),
            *self._neutral_penalties(),
        ])
        if isinstance(self.prompt, str) and not self.prompt.strip():
            raise ValueError("prompt must not be empty or only whitespace")
        if isinstance(self.prompt, list) and any(isinstance(p, str) and not p.strip() for p in self.prompt):
            raise ValueError("no prompt in the list may be empty or only whitespace")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice: a string, a list of strings, token ids, or lists of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        # The discriminator read the first item: every item is text, or every item a list of ids.
        return list(cast("list[str] | list[list[int]]", self.prompt))

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "headserve"
    parent: str | None = None  # for heads: the base they were trained on
    root: str  # the base model's name


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# OpenAI's error `type` by HTTP status; the body is {"error": {message, type, param, code}}.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}
ERROR_CODES = {429: "queue_full", 503: "not_ready"}


def openai_error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": None,
                      "code": code or ERROR_CODES.get(status)}}
