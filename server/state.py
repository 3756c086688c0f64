"""What the routes need from `app.state`, as FastAPI dependencies, so no route reaches for globals."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from heads.base import Base
from server.engine import Engine
from server.errors import AuthInvalidError, AuthMissingError, NotReadyError
from server.head_cache import HeadCache
from server.metrics import Metrics
from server.registry import Registry
from server.settings import Settings


@dataclass(frozen=True)
class Runtime:
    """Everything that exists only once the base is loaded; `app.state.runtime` is None until then."""

    base: Base
    engine: Engine
    head_cache: HeadCache
    prompt_token_limit: int
    device: str


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def get_runtime(request: Request) -> Runtime:
    """The loaded model and engine, or 503 while the base is still loading (or failed to)."""
    runtime: Runtime | None = request.app.state.runtime
    if runtime is None:
        error = request.app.state.load_error
        raise NotReadyError(f"the base model failed to load: {error}" if error else "the base model is still loading")
    return runtime


def resident_heads(request: Request) -> set[str]:
    runtime: Runtime | None = request.app.state.runtime
    return runtime.head_cache.resident() if runtime is not None else set()


def require_admin(request: Request) -> None:
    """With ADMIN_TOKEN set, the caller must send `Authorization: Bearer <token>` (401 without, 403 wrong)."""
    token = request.app.state.settings.admin_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthMissingError("this route needs an admin token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise AuthInvalidError("the admin token is not valid")


def set_head_label(request: Request, label: str) -> None:
    """Name the head for the request metrics (the middleware reads it after the response)."""
    request.state.head_label = label


# Annotated dependencies, so route signatures stay short and free of call defaults.
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
