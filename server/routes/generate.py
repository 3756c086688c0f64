"""POST /generate: validate, build the job, then answer once it is done or stream it token by token."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.errors import public_detail, status_for
from server.jobs import JobRequest, build_job, check_max_new_tokens
from server.schemas import (
    DEFAULT_MAX_NEW_TOKENS,
    Comparison,
    GenerateRequest,
    GenerateResponse,
    Timings,
    TokenLogprob,
    TopLogprob,
)
from server.sequence import Detokenizer, JobResult, Sequence
from server.sse import SSE_HEADERS, STREAMING_RESPONSES, sse_done, sse_event
from server.state import RegistryDep, Runtime, RuntimeDep, SettingsDep, label_head
from server.streaming import JobDone, JobFailed, JobStream, TokenEvent, results_unless_disconnected

router = APIRouter(tags=["generate"])


@router.post("/generate", response_model=GenerateResponse,
             responses=STREAMING_RESPONSES)
async def generate(body: GenerateRequest, request: Request, runtime: RuntimeDep, registry: RegistryDep,
                   settings: SettingsDep) -> GenerateResponse | StreamingResponse:
    max_new_tokens = body.max_new_tokens
    if "max_new_tokens" not in body.model_fields_set:
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens)
    check_max_new_tokens(max_new_tokens, settings)
    label_head(request, registry, body.head)  # 404 here for a head the registry does not hold
    job, prompt = await build_job(JobRequest(
        prompt=body.prompt, head=body.head, raw=body.raw, max_new_tokens=max_new_tokens,
        params=body.decoding.params(), seed=body.decoding.seed, stop=tuple(body.stop or ()),
        compare=tuple(body.comparisons()), ignore_eos=body.ignore_eos, top_logprobs=body.top_logprobs),
        runtime, registry)
    stream = JobStream(runtime.engine, [job], tokens=body.stream)  # 429 here, before any byte is sent
    if not body.stream:
        (result,) = await results_unless_disconnected(stream, request.receive)
        return _response(body, prompt, result, runtime)
    return StreamingResponse(_events(stream, body, prompt, runtime), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def _events(stream: JobStream, body: GenerateRequest, prompt: str, runtime: Runtime) -> AsyncIterator[bytes]:
    """`token` events as tokens are decided, then `done` with the full response (or `error`), then [DONE]."""
    tokenizer = runtime.base.tokenizer
    try:
        async for event in stream:
            if isinstance(event, TokenEvent):
                data = {"type": "token", "decoder": event.decoder, "token_id": event.token_id, "token": event.token,
                        "text": event.text, "logprob": event.logprob, "finish_reason": event.finish_reason}
                if body.top_logprobs:
                    data["top"] = [item.model_dump() for item in _top(event.top, tokenizer)]
                yield sse_event(data)
            elif isinstance(event, JobDone):
                response = _response(body, prompt, event.result, runtime)
                yield sse_event({"type": "done", "response": response.model_dump(mode="json")})
            elif isinstance(event, JobFailed):
                yield sse_event({"type": "error", "status": status_for(event.error),
                                 "detail": public_detail(event.error)})
        yield sse_done()
    finally:
        stream.close()  # the client went away (or we are done): free the batch slots before the next step


def _timings(seq: Sequence, result: JobResult, finished: float | None = None) -> Timings:
    """A sequence's timings; it finished at its last token unless `finished` says otherwise (the whole job)."""
    if finished is None:
        finished = seq.token_times[-1] if seq.token_times else result.finished_at
    first = seq.token_times[0] if seq.token_times else result.finished_at
    worked = max(finished - result.started_at, 1e-9)
    return Timings(queue_s=result.started_at - result.accepted_at, first_token_s=first - result.accepted_at,
                   total_s=finished - result.accepted_at, tokens_per_s=len(seq.token_ids) / worked)


def _response(body: GenerateRequest, prompt: str, result: JobResult, runtime: Runtime) -> GenerateResponse:
    main = result.main
    timings = _timings(main, result, finished=result.finished_at)
    logprobs = None
    if body.return_logprobs:
        tokenizer = runtime.base.tokenizer
        tops = main.top if body.top_logprobs else [None] * len(main.token_ids)
        logprobs = [TokenLogprob(token_id=t, token=tokenizer.decode([t]), logprob=lp,
                                 top=_top(top, tokenizer) if body.top_logprobs else None)
                    for t, lp, top in zip(main.token_ids, main.logprobs, tops, strict=True)]
    comparisons = None
    if result.comparisons:
        comparisons = [Comparison(decoder=seq.decoder, text=seq.text, tokens=len(seq.token_ids),
                                  finish_reason=seq.reason, timings=_timings(seq, result))
                       for seq in result.comparisons]
    return GenerateResponse(text=main.text, tokens=len(main.token_ids), finish_reason=main.reason,
                            head=body.head, prompt=prompt, timings=timings, logprobs=logprobs, comparisons=comparisons)


def _top(top: list[tuple[int, float]] | None, tokenizer: Detokenizer) -> list[TopLogprob]:
    return [TopLogprob(token_id=t, token=tokenizer.decode([t]), logprob=lp)
            for t, lp in top or []]
