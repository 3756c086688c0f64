"""`POST /v1/chat/completions`: OpenAI's Chat Completions API, streaming included.

The messages are rendered with the base's chat template (`heads.prompts.render_chat`, the
assistant's turn opened) and tokenised as training tokenises chat prompts; `model` is "base" or
a head name, and a head's `prompt_template` is not applied (the messages are the prompt, as
`/v1/completions` sends its prompt as is). A base without a chat template answers 400. The answer
ends at the tokenizer's EOS or the template's end-of-turn token (`finish_reason: "stop"`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from heads.prompts import NoChatTemplateError, has_chat_template
from server.chat_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
)
from server.errors import HeadNotFoundError, public_detail, status_for
from server.jobs import JobRequest, build_job, check_max_new_tokens
from server.openai_schemas import openai_error_body
from server.routes.openai import finish_reason, no_such_model, resolve_model, sampling_params, usage_of
from server.sequence import Detokenizer, JobResult
from server.sse import SSE_HEADERS, STREAMING_RESPONSES, sse_done, sse_event
from server.state import RegistryDep, RuntimeDep, SettingsDep
from server.streaming import JobDone, JobFailed, JobStream, TokenEvent, results_unless_disconnected

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions", response_model=ChatCompletion,
             responses=STREAMING_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request, runtime: RuntimeDep, registry: RegistryDep,
                           settings: SettingsDep) -> ChatCompletion | StreamingResponse:
    head = resolve_model(body.model, request, registry)
    tokenizer = runtime.base.tokenizer
    if not has_chat_template(tokenizer):
        raise NoChatTemplateError(f"the base model {runtime.base.name!r} has no chat template, so it cannot format "
                                  "chat messages; send plain text to /v1/completions instead")
    max_tokens = check_max_new_tokens(body.completion_tokens() or settings.max_new_tokens, settings)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    try:
        job, _ = await build_job(JobRequest(prompt=body.conversation(), head=head, max_new_tokens=max_tokens,
                                            params=sampling_params(body), seed=body.seed, stop=body.stops(),
                                            top_logprobs=top), runtime, registry)
    except HeadNotFoundError:  # deleted since it was resolved
        raise no_such_model(body.model) from None
    completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    stream = JobStream(runtime.engine, [job], tokens=body.stream)  # 429 here, before anything is sent
    if not body.stream:
        results = await results_unless_disconnected(stream, request.receive)
        main = results[0].main
        logprobs = None
        if body.logprobs:
            tops = main.top if top else [None] * len(main.token_ids)
            logprobs = ChoiceLogprobs(content=[_token_logprob(t, lp, alternatives, tokenizer) for t, lp, alternatives
                                               in zip(main.token_ids, main.logprobs, tops, strict=True)])
        choice = ChatChoice(index=0, message=AssistantMessage(content=main.text), logprobs=logprobs,
                            finish_reason=finish_reason(main.reason))
        return ChatCompletion(id=completion_id, created=created, model=body.model, choices=[choice],
                              usage=usage_of(results))
    return StreamingResponse(_chunks(stream, body, tokenizer, completion_id, created),
                             media_type="text/event-stream", headers=SSE_HEADERS)


async def _chunks(stream: JobStream, body: ChatCompletionRequest, tokenizer: Detokenizer, completion_id: str,
                  created: int) -> AsyncIterator[bytes]:
    """OpenAI's order: the role, then the content token by token (text held back as on /generate), a last
    chunk with the finish reason and an empty delta, usage if asked for, then [DONE]."""
    results: list[JobResult] = []

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: ChoiceLogprobs | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None if logprobs is None else logprobs.model_dump(),
                  "finish_reason": finish}
        return sse_event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                          "model": body.model, "system_fingerprint": None, "choices": [choice]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in stream:
            if isinstance(event, TokenEvent):
                logprobs = None
                if body.logprobs:
                    logprobs = ChoiceLogprobs(content=[_token_logprob(event.token_id, event.logprob, event.top,
                                                                      tokenizer)])
                if event.text or logprobs is not None:
                    yield chunk({"content": event.text}, logprobs=logprobs)
                if event.finish_reason is not None:
                    yield chunk({}, finish_reason(event.finish_reason))
            elif isinstance(event, JobDone):
                results.append(event.result)
            elif isinstance(event, JobFailed):
                yield sse_event(openai_error_body(status_for(event.error), public_detail(event.error)))
                break
        else:
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse_event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                 "model": body.model, "system_fingerprint": None, "choices": [],
                                 "usage": usage_of(results).model_dump()})
        yield sse_done()
    finally:
        stream.close()  # a client that went away frees its batch slot before the next step


def _token_logprob(token_id: int, logprob: float, top: list[tuple[int, float]] | None,
                   tokenizer: Detokenizer) -> TokenLogprob:
    return TokenLogprob(**_entry(token_id, logprob, tokenizer).model_dump(),
                        top_logprobs=[_entry(t, lp, tokenizer) for t, lp in top or []])


def _entry(token_id: int, logprob: float, tokenizer: Detokenizer) -> TopLogprob:
    token = tokenizer.decode([token_id])
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8", errors="replace")))

