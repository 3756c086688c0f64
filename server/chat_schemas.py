"""Bodies of `POST /v1/chat/completions`, following OpenAI's Chat Completions API.

As on `/v1/completions` (`server.openai_schemas`): fields OpenAI defines that we cannot honour
(n > 1, penalties, logit_bias) are accepted only in their neutral form and refused with a 422 that
names them otherwise, and fields OpenAI defines that we do not implement at all (tools,
response_format, ...) are refused as unknown fields, by name; nothing is silently ignored but `user`.
Sizes are bounded as a prompt is: at most `MAX_MESSAGES` messages and `MAX_PROMPT_CHARS` characters
of content in all, before anything is rendered or tokenised.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from heads.prompts import ChatMessage
from server.openai_schemas import OpenAIRequest, Usage
from server.schemas import MAX_PROMPT_CHARS, MAX_TOP_LOGPROBS

MAX_MESSAGES = 256  # messages in one conversation; their content counts against MAX_PROMPT_CHARS together

Content = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class TextPart(BaseModel):
    """OpenAI's content-part form; only text parts exist for a text-only model."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Content


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Content | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_MESSAGES)]

    def text(self) -> str:
        """The content as one string; text parts are joined by newlines (as vLLM does)."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIRequest):
    choice_of: ClassVar[str] = "conversation"

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="default: the server's MAX_NEW_TOKENS")
    max_tokens: int | None = Field(default=None, ge=1, description="OpenAI's older name for max_completion_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        self._refuse([
            self._one_choice(),
            *self._neutral_penalties(),
            (self.top_logprobs is not None and not self.logprobs, "top_logprobs needs logprobs: true"),
            (None not in (self.max_tokens, self.max_completion_tokens)
             and self.max_tokens != self.max_completion_tokens, "max_tokens and max_completion_tokens differ; set one"),
        ])
        chars = sum(len(m.text()) for m in self.messages)
        if chars > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold {chars} characters; at most {MAX_PROMPT_CHARS} in all")
        return self

    def conversation(self) -> tuple[ChatMessage, ...]:
        return tuple(ChatMessage(m.role, m.text()) for m in self.messages)

    def completion_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at this step, most likely first


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
