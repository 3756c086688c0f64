"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from heads.prompts import has_chat_template
from server.schemas import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, Limits, Readiness, Status
from server.state import MetricsDep, get_runtime

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Status)
async def healthz() -> Status:
    """200 while the process can answer at all, loading or not. Async, like /readyz: it needs no thread
    from the shared pool, so a pool busy with slow work (uploads, tokenising) never delays it."""
    return Status(status="ok")


@router.get("/readyz", response_model=Readiness)
async def readyz(request: Request) -> Readiness:
    """200 once the base is loaded and warmed up; `get_runtime` answers 503 before that. (Called, not
    declared as a dependency: FastAPI runs sync dependencies on the thread pool.) With the request limits,
    so a client that polls readiness (the page) bounds its inputs by this server's settings."""
    runtime = get_runtime(request)
    base = runtime.base
    limits = Limits(max_new_tokens=request.app.state.settings.max_new_tokens,
                    max_prompt_tokens=runtime.prompt_token_limit, max_stop_strings=MAX_STOP_STRINGS,
                    max_stop_chars=MAX_STOP_CHARS, max_top_logprobs=MAX_TOP_LOGPROBS)
    return Readiness(status="ready", base=base.info()["base_model_name_or_path"], base_fingerprint=base.fingerprint,
                     device=runtime.device, limits=limits, chat_template=has_chat_template(base.tokenizer))


@router.get("/metrics")
def metrics(metrics: MetricsDep) -> Response:
    return Response(content=metrics.render(), media_type=metrics.content_type)
