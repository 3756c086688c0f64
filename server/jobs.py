"""From a validated request to a `GenerationJob`: the steps `/generate` and `/v1/completions` share.

Format the prompt with the head's template (unless raw), tokenize it off the event loop, check
the limits, and prepare the head off the engine thread (on the head cache's loader), so the batch
keeps decoding meanwhile. The job holds the prepared head even if the cache evicts or the registry
deletes it later.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from heads.sampling import SamplingParams
from heads.storage import DEFAULT_PROMPT_TEMPLATE, PROMPT_PLACEHOLDER
from server.errors import InvalidRequestError
from server.registry import Registry
from server.schemas import BASE_LABEL
from server.sequence import GenerationJob
from server.settings import Settings
from server.state import Runtime


@dataclass(frozen=True)
class JobRequest:
    prompt: str | list[int]  # text, or token ids (always raw)
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


def prompt_template(head: str | None, registry: Registry) -> str:
    """The head's training template; raises HeadNotFoundError (404) before anything is queued."""
    return registry.metadata(head).prompt_template if head is not None else DEFAULT_PROMPT_TEMPLATE


async def build_job(request: JobRequest, runtime: Runtime, registry: Registry) -> tuple[GenerationJob, str]:
    """The job and the prompt text it decodes from (formatted, or the token ids decoded)."""
    template = prompt_template(request.head, registry)
    tokenizer = runtime.base.tokenizer
    if isinstance(request.prompt, str):
        # The formatted length, known before formatting: a prompt that cannot fit is refused before
        # the server pays for building or tokenising it.
        length = len(request.prompt) if request.raw else \
            len(template) + template.count(PROMPT_PLACEHOLDER) * (len(request.prompt) - len(PROMPT_PLACEHOLDER))
        if length > runtime.prompt_char_limit:
            raise InvalidRequestError(f"the prompt is {length} characters once formatted; no prompt longer than "
                                      f"{runtime.prompt_char_limit} characters fits the limit of "
                                      f"{runtime.prompt_token_limit} tokens")
        prompt = request.prompt if request.raw else template.replace(PROMPT_PLACEHOLDER, request.prompt)
        # Tokenizing a long prompt takes a while; keep it off the event loop.
        prompt_ids = await run_in_threadpool(lambda: list(tokenizer(prompt)["input_ids"]))
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
    head = None
    if request.head is not None:
        # Loads run on the head cache's own executor (never the shared thread pool); shielded, so a
        # client that goes away does not cancel a load other requests wait on.
        loading = asyncio.wrap_future(runtime.head_cache.submit(request.head))
        head = (await asyncio.shield(loading)).module
    job = GenerationJob(prompt_ids=prompt_ids, head=head, head_label=request.head or BASE_LABEL,
                        params=request.params,
                        seed=request.seed if request.seed is not None else secrets.randbits(63),
                        max_new_tokens=request.max_new_tokens, stop=request.stop, compare=request.compare,
                        ignore_eos=request.ignore_eos, top_logprobs=request.top_logprobs)
    return job, prompt
