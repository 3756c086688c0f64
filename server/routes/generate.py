"""POST /generate: validate, format and tokenize the prompt, enqueue, await the engine, answer."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from heads.sampling import SamplingParams
from server.errors import InvalidRequestError
from server.metrics import BASE_LABEL
from server.schemas import DEFAULT_MAX_NEW_TOKENS, Comparison, GenerateRequest, GenerateResponse, Timings, TokenLogprob
from server.sequence import GenerationJob, JobResult
from server.state import RegistryDep, Runtime, RuntimeDep, SettingsDep, set_head_label

router = APIRouter(tags=["generate"])


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, runtime: RuntimeDep, registry: RegistryDep,
                   settings: SettingsDep) -> GenerateResponse:
    max_new_tokens = body.max_new_tokens
    if "max_new_tokens" not in body.model_fields_set:
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens)
    if max_new_tokens > settings.max_new_tokens:
        raise InvalidRequestError(f"max_new_tokens must be between 1 and {settings.max_new_tokens}, "
                                  f"got {max_new_tokens}")
    template = "{problem}"
    if body.head is not None:
        template = registry.metadata(body.head).prompt_template  # 404 for an unknown head, before any queueing
    set_head_label(request, body.head or BASE_LABEL)
    prompt = body.prompt if body.raw else template.replace("{problem}", body.prompt)
    # Tokenizing a long prompt takes a while; keep it off the event loop.
    prompt_ids = await run_in_threadpool(lambda: list(runtime.base.tokenizer(prompt)["input_ids"]))
    if not prompt_ids:
        raise InvalidRequestError("the prompt encodes to no tokens")
    if len(prompt_ids) > runtime.prompt_token_limit:
        raise InvalidRequestError(f"the prompt is {len(prompt_ids)} tokens once formatted; the limit is "
                                  f"{runtime.prompt_token_limit}")
    # Preparing a head that is not resident takes a while: do it here, off the event loop and off the
    # engine thread, so the batch keeps decoding. The job holds the head even if the cache evicts it.
    head = None
    if body.head is not None:
        head = (await run_in_threadpool(runtime.head_cache.get, body.head)).module
    d = body.decoding
    job = GenerationJob(prompt_ids=prompt_ids, head=head, head_label=body.head or BASE_LABEL,
                        params=SamplingParams(strategy=d.strategy, top_k=d.top_k, top_p=d.top_p,
                                              temperature=d.temperature),
                        seed=d.seed if d.seed is not None else secrets.randbits(63),
                        max_new_tokens=max_new_tokens, stop=tuple(body.stop or ()), compare=tuple(body.comparisons()),
                        ignore_eos=body.ignore_eos)
    result = await runtime.engine.generate(job)
    return _response(body, prompt, result, runtime)


def _response(body: GenerateRequest, prompt: str, result: JobResult, runtime: Runtime) -> GenerateResponse:
    main = result.main
    worked = max(result.finished_at - result.started_at, 1e-9)
    first = main.token_times[0] if main.token_times else result.finished_at
    timings = Timings(queue_s=result.started_at - result.accepted_at, first_token_s=first - result.accepted_at,
                      total_s=result.finished_at - result.accepted_at, tokens_per_s=len(main.token_ids) / worked)
    logprobs = None
    if body.return_logprobs:
        tokenizer = runtime.base.tokenizer
        logprobs = [TokenLogprob(token_id=t, token=tokenizer.decode([t]), logprob=lp)
                    for t, lp in zip(main.token_ids, main.logprobs, strict=True)]
    comparisons = None
    if result.comparisons:
        comparisons = [Comparison(decoder=seq.decoder, text=seq.text, tokens=len(seq.token_ids),
                                  finish_reason=seq.reason) for seq in result.comparisons]
    return GenerateResponse(text=main.text, tokens=len(main.token_ids), finish_reason=main.reason,
                            head=body.head, prompt=prompt, timings=timings, logprobs=logprobs, comparisons=comparisons)
