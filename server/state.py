"""What the routes need from `app.state`, as FastAPI dependencies, so no route reaches for globals."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from heads.base import Base
from server.engine import Engine
from server.errors import AuthInvalidError, AuthMissingError, NotReadyError, WritesDisabledError
from server.head_cache import HeadCache
from server.metrics import UNKNOWN_LABEL, Metrics
from server.registry import Registry
from server.schemas import BASE_LABEL
from server.settings import Settings


@dataclass(frozen=True)
class Runtime:
    """Everything that exists only once the base is loaded; `app.state.runtime` is None until then."""

    base: Base
    engine: Engine
    head_cache: HeadCache
    prompt_token_limit: int
    prompt_char_limit: int  # longer prompts cannot fit prompt_token_limit (server.limits.prompt_char_limit)
    device: str


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_runtime(request: Request) -> Runtime:
    """The loaded model and engine, or 503 while the base is still loading (or failed to)."""
    return ready_runtime(request.app)


def ready_runtime(app: FastAPI) -> Runtime:
    """The one readiness rule, shared by /readyz, every route that needs the model and Ray Serve's health check
    (server.ray_app): the runtime once the base is loaded, else NotReadyError saying why."""
    runtime: Runtime | None = app.state.runtime
    if runtime is None:
        error = app.state.load_error
        raise NotReadyError(f"the base model failed to load: {error}" if error else "the base model is still loading")
    return runtime


def resident_heads(request: Request) -> set[str]:
    runtime: Runtime | None = request.app.state.runtime
    return runtime.head_cache.resident() if runtime is not None else set()


def require_admin(request: Request) -> None:
    """With ADMIN_TOKEN set, the caller must send `Authorization: Bearer <token>` (401 without, 403 wrong).

    Without it, writes are allowed only when the server listens on a loopback address, so a server
    reachable from the network never takes anonymous registry writes (403).
    """
    settings: Settings = request.app.state.settings
    token = settings.admin_token
    if token is None:
        if settings.listens_on_loopback:
            return
        raise WritesDisabledError("registry writes are disabled: this server listens beyond loopback without an admin "
                                  "token; its operator enables them by setting HEADSERVE_ADMIN_TOKEN")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthMissingError("this route needs an admin token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise AuthInvalidError("the admin token is not valid")


def set_head_label(request: Request, label: str) -> None:
    """Name the head for the request metrics (the middleware reads it after the response).

    Only with `BASE_LABEL`, `UNKNOWN_LABEL` or a name the registry has just resolved: a label
    taken from the request before that would let any client add series (see `label_head`).
    """
    request.state.head_label = label


def label_head(request: Request, registry: Registry, name: str | None) -> None:
    """Resolve the head a request names (404/409/422 if the registry cannot) and only then label the
    request with it; until then, and if it fails, the request is labelled `unknown`."""
    if name is None:
        set_head_label(request, BASE_LABEL)
        return
    set_head_label(request, UNKNOWN_LABEL)
    registry.metadata(name)
    set_head_label(request, name)


# Annotated dependencies, so route signatures stay short and free of call defaults.
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
