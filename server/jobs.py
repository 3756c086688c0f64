"""From a validated request to a `GenerationJob`: the steps `/generate` and the `/v1` routes share.

Format the prompt as the head was trained (`heads.prompts`: its template, and the base's chat
template for a chat-format head; none of it when raw) or render chat messages, tokenize it off the
event loop, check the limits, and prepare the head off the engine thread (on the head cache's
loader), so the batch keeps decoding meanwhile. The job holds the prepared head even if the cache evicts or the registry
deletes it later.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from heads.prompts import (
    RAW,
    ChatMessage,
    NoChatTemplateError,
    PromptFormat,
    PromptStyle,
    base_style,
    encode,
    end_ids,
    render_chat,
)
from heads.registry import get_head_type
from heads.sampling import SamplingParams
from server.errors import HeadKindError, HeadUnavailableError, InvalidRequestError
from server.head_cache import LoadedHead
from server.registry import Registry
from server.schemas import BASE_LABEL
from server.sequence import GenerationJob
from server.settings import Settings
from server.state import Runtime


@dataclass(frozen=True)
class JobRequest:
    prompt: str | list[int] | tuple[ChatMessage, ...]  # text; token ids (always raw); chat messages (/v1/chat)
    head: str | None  # registry name; None: the base's own linear head
    max_new_tokens: int
    params: SamplingParams
    seed: int | None = None  # None: a fresh random seed
    raw: bool = False
    stop: tuple[str, ...] = ()
    compare: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0


def check_max_new_tokens(value: int, settings: Settings) -> int:
    if not 1 <= value <= settings.max_new_tokens:
        raise InvalidRequestError(f"max_new_tokens must be between 1 and {settings.max_new_tokens}, got {value}")
    return value


def check_generative(head: str | None, kind: str | None) -> None:
    """Refuse (422, naming the kind) to generate with a head that gives label probabilities, not text."""
    if head is None or kind is None:
        return
    if not get_head_type(kind).generative:
        raise HeadKindError(f"head {head!r} is a {kind} head: it gives label probabilities, not text, so it cannot "
                            "generate; classify with it (POST /classify)")


def check_prompt_chars(length: int, runtime: Runtime, what: str = "the prompt", hint: str = "") -> None:
    """Refuse a prompt of more characters than could fit the token limit, before tokenising it (`what` names it
    in the message, `hint` says what else the caller could send)."""
    if length > runtime.prompt_char_limit:
        raise InvalidRequestError(f"{what} is {length} characters once formatted; no prompt longer than "
                                  f"{runtime.prompt_char_limit} characters fits the limit of "
                                  f"{runtime.prompt_token_limit} tokens{hint}")


def format_prompt(prompt: str | tuple[ChatMessage, ...], style: PromptStyle, head: str | None,
                  runtime: Runtime, *, bounded: bool = True) -> tuple[str, PromptFormat]:
    """The text to tokenise and how: a problem in its style (bounded before it is built, unless the caller
    bounds it itself), or chat messages rendered with the base's chat template (bounded by the request schema)."""
    tokenizer = runtime.base.tokenizer
    if isinstance(prompt, tuple):
        return render_chat(prompt, tokenizer), "chat"
    if bounded:
        check_prompt_chars(style.filled_length(len(prompt)), runtime)
    try:
        return style.text(prompt, tokenizer), style.format
    except NoChatTemplateError:
        raise NoChatTemplateError(f"the head '{head}' was trained on chat-formatted prompts, but this base model "
                                  "has no chat template; send the prompt with raw: true") from None


async def prepare_head(name: str, runtime: Runtime) -> LoadedHead:
    """The head loaded and ready to run. Loads run on the head cache's own executor (never the shared thread
    pool), shielded, so a client that goes away does not cancel a load other requests wait on."""
    return await asyncio.shield(asyncio.wrap_future(runtime.head_cache.submit(name)))


REPLAN_TRIES = 3  # a head replaced between its metadata read and its load is planned again, this many times at most


async def build_job(request: JobRequest, runtime: Runtime, registry: Registry) -> tuple[GenerationJob, str]:
    """The job and the prompt text it decodes from (formatted, or the token ids decoded).

    The prompt is formatted from the head's metadata before the head is loaded (so a bad prompt costs no load);
    if the head was replaced in between, the version loaded decides: its template and its kind."""
    meta = registry.metadata(request.head) if request.head is not None else None
    style = meta.prompt_style if meta is not None else base_style(runtime.base.tokenizer)
    check_generative(request.head, meta.head_type if meta is not None else None)
    for _ in range(REPLAN_TRIES):
        prompt, prompt_ids, ends = await _encode_prompt(request, style, runtime)
        if request.head is None:
            head = None
            break
        loaded = await prepare_head(request.head, runtime)
        check_generative(request.head, loaded.meta.head_type)
        head = loaded.module
        if loaded.meta.prompt_style == style or request.raw or not isinstance(request.prompt, str):
            break
        style = loaded.meta.prompt_style  # replaced meanwhile: format as the version loaded was trained
    else:
        raise HeadUnavailableError(f"head {request.head!r} is being replaced too often to serve; send the request "
                                   "again")
    job = GenerationJob(prompt_ids=prompt_ids, head=head, head_label=request.head or BASE_LABEL,
                        params=request.params,
                        seed=request.seed if request.seed is not None else secrets.randbits(63),
                        max_new_tokens=request.max_new_tokens, stop=request.stop, compare=request.compare,
                        ignore_eos=request.ignore_eos, end_ids=ends, top_logprobs=request.top_logprobs)
    return job, prompt


async def _encode_prompt(request: JobRequest, style: PromptStyle,
                         runtime: Runtime) -> tuple[str, list[int], tuple[int, ...]]:
    """The prompt text, its token ids (within the limits) and the extra end tokens of its format."""
    tokenizer = runtime.base.tokenizer
    ends: tuple[int, ...] = ()
    if not isinstance(request.prompt, list):
        prompt, prompt_format = format_prompt(request.prompt, RAW if request.raw else style, request.head, runtime)
        # The chat template's own text counts too: the bound holds for exactly what is tokenised.
        check_prompt_chars(len(prompt), runtime)
        # Tokenizing a long prompt takes a while; keep it off the event loop.
        prompt_ids = await run_in_threadpool(encode, prompt, tokenizer, prompt_format)
        if prompt_format == "chat":
            ends = end_ids(tokenizer, "chat")
    else:
        if len(request.prompt) > runtime.prompt_token_limit:
            raise InvalidRequestError(f"the prompt is {len(request.prompt)} token ids; the limit is "
                                      f"{runtime.prompt_token_limit}")
        vocab = runtime.base.vocab_size
        bad = [t for t in request.prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab}); got {bad[0]}")
        prompt_ids = list(request.prompt)
        prompt = tokenizer.decode(prompt_ids)
    if not prompt_ids:
        raise InvalidRequestError("the prompt encodes to no tokens")
    if len(prompt_ids) > runtime.prompt_token_limit:
        raise InvalidRequestError(f"the prompt is {len(prompt_ids)} tokens once formatted; the limit is "
                                  f"{runtime.prompt_token_limit}")
    return prompt, prompt_ids, ends
