"""Serve headserve on Ray Serve: N replicas of the unchanged FastAPI app behind Ray's HTTP proxy.

Scale-out reuses an existing distributed engine instead of a home-made cluster. Each replica is one
whole server: it builds its own app with `create_app` (so the lifespan loads its own base and starts
its own engine and continuous batcher), and all replicas read and write one registry folder
(HEADSERVE_HEADS_DIR on a shared volume), which is the source of truth every request consults. Ray only
routes whole HTTP requests to replicas; it never batches (no `@serve.batch`), so the engine inside each
replica keeps mixing heads in one step as it does in a single process.

    serve run server.ray_app:build_app                      # HEADSERVE_* from the environment
    serve run server.ray_app:build_app replicas=2 heads_dir=/shared/heads

Ray settings come from HEADSERVE_RAY_* (`RaySettings`) or the same names as builder arguments; every
other argument overrides one server setting (`server.settings.Settings`) in every replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.app import create_app
from server.errors import NotReadyError
from server.seed import seed_default_registry
from server.settings import Settings
from server.state import ready_runtime

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "headserve"
REPLICA_HEADER = "x-headserve-replica"  # which replica answered: for logs, debugging and the tests
# Ray's proxy binds the socket, not this app, and can listen on any interface (a cluster's does): the app
# counts itself as reachable from the network, so registry writes need HEADSERVE_ADMIN_TOKEN (safe by default).
PROXY_HOST = "0.0.0.0"
READY_POLL_S = 0.2


class RaySettings(BaseSettings):
    """How Ray runs the replicas (HEADSERVE_RAY_*); what each replica serves stays in `Settings`."""

    model_config = SettingsConfigDict(env_prefix="HEADSERVE_RAY_", extra="ignore", env_ignore_empty=True)

    replicas: int = Field(default=1, ge=1)  # a fixed count, unless min/max_replicas ask for autoscaling
    min_replicas: int | None = Field(default=None, ge=0)  # with max_replicas: Ray autoscales between the two
    max_replicas: int | None = Field(default=None, ge=1)
    # Requests per replica that Ray's autoscaler aims for; default: one full engine batch (max_batch_size).
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    # Ray resources per replica; Ray also sets a replica's OMP_NUM_THREADS (its torch threads) to num_cpus unless
    # the environment sets one.
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)  # 1 with HEADSERVE_DEVICE=cuda: one GPU per replica
    # How long a replica may take to load and warm up its base before Ray counts its start as failed.
    load_timeout_s: float = Field(default=900.0, gt=0)

    @model_validator(mode="after")
    def _autoscaling_bounds(self) -> RaySettings:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas (autoscaling) or neither (fixed replicas)")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    def deployment_options(self, settings: Settings) -> dict[str, Any]:
        """Options for `serve.deployment(...).options()`.

        Ray's default of 5 requests in flight per replica would starve the continuous batcher, so a replica
        takes what its engine can hold: a full batch plus its queue (beyond that, the app answers 429 itself).
        """
        options: dict[str, Any] = {
            "max_ongoing_requests": settings.max_batch_size + settings.max_queue,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or settings.max_batch_size}
        return options


def replica_settings(overrides: dict[str, Any]) -> Settings:
    """One replica's server settings: HEADSERVE_* from its environment, then the builder's overrides."""
    return Settings(**{**overrides, "host": PROXY_HOST})


class ReplicaHeader:
    """Names the replica on every answer, so a client (or a test) can tell which one served it."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, send_named if scope["type"] == "http" else send)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()  # the app is built in each replica (__serve_build_asgi_app__), never pickled from the driver
class HeadserveReplica:
    """One replica: its own app, base and engine; Ray runs its lifespan and asks `check_health`."""

    def __init__(self, overrides: dict[str, Any], load_timeout_s: float) -> None:
        if not logging.getLogger().handlers:  # Ray configures its own loggers only: ours would drop INFO
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.settings = replica_settings(overrides)
        self.load_timeout_s = load_timeout_s
        self.started = time.monotonic()
        self.server_app: FastAPI | None = None
        seed_default_registry(self.settings)  # as `python -m server` does; a no-op for a named registry
        log.info("headserve replica: registry %s, %d torch threads", self.settings.heads_dir, torch.get_num_threads())

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        self.server_app = app
        return app

    async def check_health(self) -> None:
        """Ray's readiness and liveness check: the app's own rule, as /readyz (see `wait_ready`)."""
        if self.server_app is None:
            raise NotReadyError("the app is not built yet")
        await wait_ready(self.server_app, self.started + self.load_timeout_s)


async def wait_ready(app: FastAPI, deadline: float) -> None:
    """Return once `app` is ready (`ready_runtime`); NotReadyError if its base failed to load or at `deadline`.

    Ray routes to a replica only after its first health check passes, so that check waits while the base
    loads; a base that failed to load fails it, and Ray replaces the replica. Later checks find the
    runtime at once.
    """
    while True:
        try:
            ready_runtime(app)
            return
        except NotReadyError:
            if app.state.load_error is not None or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(READY_POLL_S)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application builder `serve run server.ray_app:build_app [name=value ...]` calls.

    Arguments named like a `RaySettings` field set it; the rest override server settings in every
    replica. Both are validated here, so a bad value stops `serve run` instead of failing replicas.
    """
    args = dict(args or {})
    ray_fields = {name: args.pop(name) for name in list(args) if name in RaySettings.model_fields}
    try:
        ray_settings = RaySettings(**ray_fields)
        settings = replica_settings(args)
    except ValidationError as e:
        raise ValueError(f"invalid headserve Ray settings: {e}") from None
    options = ray_settings.deployment_options(settings)
    log.info("headserve on Ray Serve: %s", options)
    return HeadserveReplica.options(**options).bind(args, ray_settings.load_timeout_s)  # type: ignore[attr-defined]
