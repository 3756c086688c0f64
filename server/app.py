"""Build the FastAPI app: state on `app.state`, a lifespan that loads the base, and error mapping.

The base loads in a background thread started by the lifespan, so `/healthz` answers while a big
base is still loading and `/readyz` (and every route that needs the model) answers 503 until the
base is loaded, fingerprinted and warmed up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heads import HeadError
from heads.base import load_base
from heads.prompts import NoChatTemplateError
from server.engine import Engine
from server.errors import AuthMissingError, HeadNotFoundError, QueueFullError, ServerError, is_mapped, status_for
from server.head_cache import HeadCache
from server.limits import BodyLimitMiddleware, prompt_char_limit
from server.metrics import Metrics
from server.openai_schemas import openai_error_body
from server.registry import Registry
from server.routes import chat, classify, generate, heads, health, openai, web
from server.settings import Settings, get_settings
from server.state import Runtime

log = logging.getLogger(__name__)

def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # /docs and /redoc load Swagger UI and ReDoc from this server (/static-offline-docs), never from a CDN.
    app = FastAPIOffline(title="headserve", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.registry = Registry(settings.heads_dir)
    app.state.runtime = None  # set by the loader once the base is ready
    app.state.load_error = None
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)  # inside: its 413s are counted
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics)
    app.add_exception_handler(ServerError, _domain_error)
    app.add_exception_handler(HeadError, _domain_error)
    app.add_exception_handler(NoChatTemplateError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for router in (generate.router, classify.router, heads.router, health.router, openai.router, chat.router,
                   web.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.admin_token is None and not settings.listens_on_loopback:
        log.warning("POST and DELETE /heads are disabled: the server listens on %s without an admin token; set "
                    "HEADSERVE_ADMIN_TOKEN to enable them (callers then send 'Authorization: Bearer <token>')",
                    settings.host)
    stopping, gate = threading.Event(), threading.Lock()
    loader = threading.Thread(target=load_runtime, args=(app, stopping, gate), name="headserve-loader", daemon=True)
    loader.start()
    try:
        yield
    finally:
        with gate:  # after this, the loader has either published its runtime (stopped below) or never will
            stopping.set()
        loader.join(timeout=60)
        runtime: Runtime | None = app.state.runtime
        if runtime is not None:
            runtime.engine.stop()
        app.state.runtime = None


def load_runtime(app: FastAPI, stopping: threading.Event, gate: threading.Lock) -> None:
    """Load, fingerprint and warm up the base, start the engine, then flip readiness.

    Starting the engine and publishing the runtime happen under `gate`, the lock the lifespan holds
    while it sets `stopping`: a shutdown that begins during start-up either finds the runtime and
    stops its engine, or keeps the engine from ever starting; never an engine left running after it.
    """
    settings: Settings = app.state.settings
    start = time.perf_counter()
    try:
        base = load_base(settings.base_model, device=settings.device, dtype=settings.torch_dtype,
                         cache_dir=settings.cache_dir)
        head_cache = HeadCache(app.state.registry, base, app.state.metrics, settings.head_cache_size,
                               materialize_after=settings.materialize_after)
        engine = Engine(base, app.state.metrics, max_queue=settings.max_queue, max_batch_size=settings.max_batch_size,
                        max_batch_tokens=settings.max_batch_tokens)
        engine.warm_up()
        token_limit = settings.prompt_token_limit(base.n_positions)
        char_limit = prompt_char_limit(token_limit, base.tokenizer)
    except Exception as e:
        log.exception("loading the base model %r failed", settings.base_model)
        app.state.load_error = f"{type(e).__name__}: {e}"
        return
    runtime = Runtime(base=base, engine=engine, head_cache=head_cache, prompt_token_limit=token_limit,
                      prompt_char_limit=char_limit, device=str(base.device))
    with gate:
        if stopping.is_set():
            return
        engine.start()
        app.state.runtime = runtime
    log.info("ready: base %s (%s) on %s in %.1fs", base.name, base.fingerprint, base.device,
             time.perf_counter() - start)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_for(exc)
    headers = {}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, AuthMissingError):
        headers["WWW-Authenticate"] = "Bearer"
    if not is_mapped(exc):  # a ServerError subclass nobody mapped: a bug, not the client's fault
        log.error("unmapped domain error %s: %s", type(exc).__name__, exc)
        return _error(request, 500, "internal server error")
    code = "model_not_found" if isinstance(exc, HeadNotFoundError) else None  # only read under /v1
    return _error(request, status, str(exc), headers, code)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return _error(request, 422, describe_validation_errors(errors))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in the same shapes as ours."""
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    detail = exc.detail if isinstance(exc, StarletteHTTPException) else "internal server error"
    headers = getattr(exc, "headers", None) or {}
    return _error(request, status, str(detail), headers)


def _error(request: Request, status: int, message: str, headers: dict[str, str] | None = None,
           code: str | None = None) -> JSONResponse:
    """`{"detail": ...}` everywhere, except OpenAI's `{"error": {...}}` under /v1, which its clients parse."""
    if _is_openai(request.url.path):
        return JSONResponse(openai_error_body(status, message, code), status_code=status, headers=headers)
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def describe_validation_errors(errors: Any) -> str:
    """FastAPI's list of error dicts -> one readable line, e.g. 'body.max_new_tokens: Input should be ...'."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON{': ' + str(reason) if reason else ''}")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


class ObservabilityMiddleware:
    """Request metrics for every route, and the catch-all that turns any unhandled error into a plain 500.

    A pure ASGI middleware sits inside Starlette's error middleware, so it sees the exception
    before anything could print a traceback to the client; it logs it and answers a generic detail.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, started = time.perf_counter(), 500, False

        async def send_and_watch(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            status = 500
            path = str(scope.get("path", ""))
            body = openai_error_body(500, "internal server error") if _is_openai(path) else {
                "detail": "internal server error"}
            await JSONResponse(body, status_code=500)(scope, receive, send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            head = (scope.get("state") or {}).get("head_label", "")
            self.metrics.observe_request(path, head, status, time.perf_counter() - start)
