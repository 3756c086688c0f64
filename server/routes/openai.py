"""The OpenAI-compatible API: `GET /v1/models` and `POST /v1/completions`, streaming included.
(`POST /v1/chat/completions` lives in `server.routes.chat` and shares the helpers below.)

`model` is "base" (the base's own linear head) or a head name. Prompts are completed as sent,
like OpenAI's Completions API: a head's `prompt_template` is not applied (see `GET /heads/{name}`
for it). Every prompt of a list becomes a job of the same batch. Errors use OpenAI's shape
(`server.app` maps them for every `/v1` path).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from heads.sampling import SamplingParams
from server.errors import HeadNotFoundError, InvalidRequestError, public_detail, status_for
from server.jobs import JobRequest, build_job, check_max_new_tokens
from server.metrics import UNKNOWN_LABEL
from server.openai_schemas import (
    DEFAULT_MAX_TOKENS,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Logprobs,
    Model,
    ModelList,
    OpenAIRequest,
    Usage,
    openai_error_body,
)
from server.registry import Registry
from server.schemas import BASE_LABEL, HEAD_NAME_PATTERN, FinishReason
from server.sequence import Detokenizer, JobResult, Sequence
from server.sse import SSE_HEADERS, STREAMING_RESPONSES, sse_done, sse_event
from server.state import RegistryDep, Runtime, RuntimeDep, SettingsDep, label_head, set_head_label
from server.streaming import JobDone, JobFailed, JobStream, TokenEvent, results_unless_disconnected

router = APIRouter(prefix="/v1", tags=["openai"])
BASE_MODEL_ID = BASE_LABEL
# `created` of the base, and of a head whose config has no usable `created_at`: no time of this process (such as when it
# started), so that every replica serving one registry answers GET /v1/models alike.
CREATED_UNKNOWN = 0


@router.get("/models", response_model=ModelList)
def list_models(runtime: RuntimeDep, registry: RegistryDep) -> ModelList:
    models = [_base_model(runtime)]
    for name in registry.names():
        try:
            models.append(_head_model(name, runtime, registry))
        except Exception:  # a broken folder in the registry is listed by /heads, not offered as a model
            continue
    return ModelList(data=models)


@router.get("/models/{model_id}", response_model=Model)
def get_model(model_id: str, runtime: RuntimeDep, registry: RegistryDep) -> Model:
    if model_id == BASE_MODEL_ID:
        return _base_model(runtime)
    try:
        return _head_model(_head_name(model_id), runtime, registry)
    except HeadNotFoundError:
        raise no_such_model(model_id) from None


@router.post("/completions", response_model=Completion,
             responses=STREAMING_RESPONSES)
async def completions(body: CompletionRequest, request: Request, runtime: RuntimeDep, registry: RegistryDep,
                      settings: SettingsDep) -> Completion | StreamingResponse:
    head = resolve_model(body.model, request, registry)
    max_tokens = check_max_new_tokens(body.max_tokens or DEFAULT_MAX_TOKENS, settings)
    params = sampling_params(body)
    top = body.logprobs or 0
    jobs = []
    for prompt in body.prompts():
        try:
            job, _ = await build_job(JobRequest(prompt=prompt, head=head, raw=True, max_new_tokens=max_tokens,
                                                   params=params, seed=body.seed, stop=body.stops(), top_logprobs=top),
                                        runtime, registry)
        except HeadNotFoundError:
            raise no_such_model(body.model) from None
        jobs.append(job)
    completion_id, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    stream = JobStream(runtime.engine, jobs, tokens=body.stream)  # 429 here, before anything is sent
    if not body.stream:
        results = await results_unless_disconnected(stream, request.receive)
        choices = [_choice(i, r.main, body, runtime) for i, r in enumerate(results)]
        return Completion(id=completion_id, created=created, model=body.model, choices=choices,
                          usage=usage_of(results))
    return StreamingResponse(_chunks(stream, body, runtime, completion_id, created), media_type="text/event-stream",
                             headers=SSE_HEADERS)


def resolve_model(model: str, request: Request, registry: Registry) -> str | None:
    """The head a `model` names (None: the base), once the registry knows it; a 404 `model_not_found` otherwise.
    The request is labelled `unknown` for the metrics until then."""
    set_head_label(request, UNKNOWN_LABEL)
    head = None if model == BASE_MODEL_ID else _head_name(model)
    try:
        label_head(request, registry, head)
    except HeadNotFoundError:
        raise no_such_model(model) from None
    return head


def sampling_params(body: OpenAIRequest) -> SamplingParams:
    """OpenAI's knobs -> our sampler: temperature 0 is greedy; top_k (an extension) or top_p truncate."""
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature == 0.0:
        return SamplingParams(strategy="greedy")
    if body.top_k is not None:
        if body.top_p is not None and body.top_p < 1.0:
            raise InvalidRequestError("set top_k or top_p, not both")
        return SamplingParams(strategy="top_k", top_k=body.top_k, temperature=temperature)
    return SamplingParams(strategy="top_p", top_p=1.0 if body.top_p is None else body.top_p, temperature=temperature)


async def _chunks(stream: JobStream, body: CompletionRequest, runtime: Runtime, completion_id: str,
                  created: int) -> AsyncIterator[bytes]:
    """One chunk per token (its text may be empty while held back), usage if asked for, then [DONE]."""
    tokenizer = runtime.base.tokenizer
    offsets: dict[int, int] = {}
    results: list[JobResult] = []

    def chunk(choices: list[dict[str, object]], usage: Usage | None = None) -> bytes:
        data = {"id": completion_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage.model_dump()
        return sse_event(data)

    try:
        async for event in stream:
            if isinstance(event, TokenEvent):
                logprobs = None
                if body.logprobs is not None:
                    offset = offsets.get(event.job, 0)
                    offsets[event.job] = offset + len(event.token)  # as `_choice` counts them
                    logprobs = Logprobs(tokens=[event.token], token_logprobs=[event.logprob],
                                        top_logprobs=[top_by_text(event.top, tokenizer)] if body.logprobs else None,
                                        text_offset=[offset]).model_dump()
                yield chunk([{"index": event.job, "text": event.text, "logprobs": logprobs,
                              "finish_reason": finish_reason(event.finish_reason)}])
            elif isinstance(event, JobDone):
                results.append(event.result)
            elif isinstance(event, JobFailed):
                status = status_for(event.error)
                yield sse_event(openai_error_body(status, public_detail(event.error)))
                break
        else:
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], usage_of(results))
        yield sse_done()
    finally:
        stream.close()  # a client that went away frees its batch slots before the next step


def _choice(index: int, seq: Sequence, body: CompletionRequest, runtime: Runtime) -> CompletionChoice:
    logprobs = None
    if body.logprobs is not None:
        tokenizer = runtime.base.tokenizer
        tokens = [tokenizer.decode([t]) for t in seq.token_ids]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        logprobs = Logprobs(tokens=tokens, token_logprobs=seq.logprobs,
                            top_logprobs=[top_by_text(t, tokenizer) for t in seq.top] if body.logprobs else None,
                            text_offset=offsets)
    return CompletionChoice(index=index, text=seq.text, logprobs=logprobs, finish_reason=finish_reason(seq.reason))


def top_by_text(top: list[tuple[int, float]] | None, tokenizer: Detokenizer) -> dict[str, float]:
    out: dict[str, float] = {}
    for token_id, logprob in top or []:
        out.setdefault(tokenizer.decode([token_id]), logprob)
    return out


def finish_reason(reason: FinishReason | None) -> Literal["stop", "length"] | None:
    """Ours -> OpenAI's: the end-of-sequence token and stop strings are both "stop"."""
    if reason is None:
        return None
    return "length" if reason == FinishReason.length else "stop"


def usage_of(results: list[JobResult]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.main.token_ids) for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _head_name(model: str) -> str:
    """A model id that cannot be a head name is simply a model that does not exist (404, not 422)."""
    if not re.fullmatch(HEAD_NAME_PATTERN, model):
        raise no_such_model(model)
    return model


def no_such_model(model: str) -> HeadNotFoundError:
    return HeadNotFoundError(f"the model '{model[:80]}' does not exist; GET /v1/models lists them")


def _base_model(runtime: Runtime) -> Model:
    return Model(id=BASE_MODEL_ID, created=CREATED_UNKNOWN, root=runtime.base.name)


def _head_model(name: str, runtime: Runtime, registry: Registry) -> Model:
    meta = registry.metadata(name)
    try:
        created = int(datetime.fromisoformat(meta.created_at).timestamp())
    except (TypeError, ValueError):
        created = CREATED_UNKNOWN
    return Model(id=name, created=created, parent=runtime.base.name, root=runtime.base.name)
