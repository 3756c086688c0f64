"""How a problem becomes the token ids a base reads: the one place prompts are formatted and tokenised.

Training (`training.data.encode`, `training.evaluate`) and serving (`/generate`, the page, the CLI,
`/v1/chat/completions`) all format through here, so a head is served on exactly the ids it was
trained on. A head records its `prompt_template` and `prompt_format`:

- "plain": the template with the problem in place of `{problem}`, tokenised as the tokenizer likes
  (with whatever special tokens it adds by itself, e.g. none for GPT-2).
- "chat": the filled template is the single user message, rendered with the base tokenizer's chat
  template and the assistant's turn opened (`add_generation_prompt=True`). The rendered text already
  holds its special tokens (`<|im_start|>` ...), so it is tokenised without adding any, exactly as
  `apply_chat_template(tokenize=True)` does; a second BOS would be a prompt training never saw.

An instruct base answers a raw problem poorly, so a chat base's own head (no head named) also gets
chat formatting (`base_style`). Where an answer ends follows the format: the tokenizer's EOS, plus
the chat template's end-of-turn token where that is another one (`end_ids`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

log = logging.getLogger(__name__)

PROMPT_PLACEHOLDER = "{problem}"  # where a prompt_template takes the problem
# What a head that records no template means, and what the base alone is asked on /generate.
DEFAULT_PROMPT_TEMPLATE = PROMPT_PLACEHOLDER
# What `training.fit` trains plain heads with unless told otherwise (the committed heads use it).
TRAINING_PROMPT_TEMPLATE = "Problem: {problem}\nSolution:"
PromptFormat = Literal["plain", "chat"]
PROMPT_FORMATS: tuple[PromptFormat, ...] = get_args(PromptFormat)
CHAT_ROLES = ("system", "user", "assistant")
_TURN_PROBE = "headserve end-of-turn probe"  # an assistant message whose rendering shows what closes a turn


class NoChatTemplateError(ValueError):
    """Chat formatting was asked of a base whose tokenizer has no chat template."""


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of CHAT_ROLES
    content: str


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(messages: Sequence[ChatMessage], tokenizer: Any) -> str:
    """The conversation as the base's chat template writes it, with the assistant's turn opened."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplateError("the base model has no chat template, so it cannot format chat messages")
    rendered = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             tokenize=False, add_generation_prompt=True)
    return cast(str, rendered)


def encode(text: str, tokenizer: Any, prompt_format: PromptFormat) -> list[int]:
    """Token ids of an already formatted prompt: chat-rendered text carries its special tokens already."""
    if prompt_format == "chat":
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def end_ids(tokenizer: Any, prompt_format: PromptFormat) -> tuple[int, ...]:
    """The tokens that end an answer, the one training appends to a target first.

    Plain: the tokenizer's EOS. Chat: the token the chat template closes an assistant turn with when
    it is a special token (Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`; SmolLM2's `<|im_end|>`
    is its EOS anyway), then EOS. Found by rendering a short exchange, so no template is named here.
    """
    eos = tokenizer.eos_token_id
    ids = [] if eos is None else [int(eos)]
    if prompt_format == "chat" and has_chat_template(tokenizer):
        turn = _end_of_turn_id(tokenizer)
        if turn is not None and turn not in ids:
            ids.insert(0, turn)
    return tuple(ids)


def _end_of_turn_id(tokenizer: Any) -> int | None:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _TURN_PROBE}], tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template may refuse this exchange; EOS alone ends turns then
        log.debug("the chat template cannot render a probe exchange: %s", e)
        return None
    at = text.rfind(_TURN_PROBE)
    if at < 0:
        return None
    after = tokenizer(text[at + len(_TURN_PROBE):], add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return int(after[0]) if after and after[0] in special else None


@dataclass(frozen=True)
class PromptStyle:
    """How one head (or the base alone) turns a problem into a prompt: its template and format."""

    template: str = DEFAULT_PROMPT_TEMPLATE
    format: PromptFormat = "plain"

    def fill(self, problem: str) -> str:
        return self.template.replace(PROMPT_PLACEHOLDER, problem)

    def filled_length(self, problem_chars: int) -> int:
        """Characters of `fill(problem)` for a problem of this many, known without building it."""
        return len(self.template) + self.template.count(PROMPT_PLACEHOLDER) * (problem_chars - len(PROMPT_PLACEHOLDER))

    def text(self, problem: str, tokenizer: Any) -> str:
        """The prompt as the base reads it: the filled template, rendered as the user's message for chat."""
        filled = self.fill(problem)
        if self.format == "chat":
            return render_chat([ChatMessage("user", filled)], tokenizer)
        return filled

    def encode(self, text: str, tokenizer: Any) -> list[int]:
        """Ids of a `text()` result."""
        return encode(text, tokenizer, self.format)

    def ids(self, problem: str, tokenizer: Any) -> list[int]:
        return self.encode(self.text(problem, tokenizer), tokenizer)

    def end_ids(self, tokenizer: Any) -> tuple[int, ...]:
        return end_ids(tokenizer, self.format)


RAW = PromptStyle()  # the text as sent: `raw: true`, /v1/completions


def base_style(tokenizer: Any) -> PromptStyle:
    """The base's own head, no head named: the problem as the user message on a chat base, as is otherwise."""
    return PromptStyle(DEFAULT_PROMPT_TEMPLATE, "chat" if has_chat_template(tokenizer) else "plain")


def training_style(tokenizer: Any, prompt_format: PromptFormat | Literal["auto"] = "auto",
                   template: str | None = None) -> PromptStyle:
    """The style a head is trained with (and the evaluation's base rows use): "auto" means chat on a base
    with a chat template. Unless a template is given, a plain prompt is `Problem: ...\\nSolution:` and a chat
    prompt the problem alone as the user's message."""
    resolved: PromptFormat = prompt_format if prompt_format != "auto" else (
        "chat" if has_chat_template(tokenizer) else "plain")
    if resolved == "chat" and not has_chat_template(tokenizer):
        raise NoChatTemplateError("the base model has no chat template: chat-formatted prompts need one "
                                  "(train with --prompt-format plain)")
    if template is None:
        template = DEFAULT_PROMPT_TEMPLATE if resolved == "chat" else TRAINING_PROMPT_TEMPLATE
    if PROMPT_PLACEHOLDER not in template:
        raise ValueError(f"a prompt template must contain {PROMPT_PLACEHOLDER}, got {template!r}")
    return PromptStyle(template, resolved)
