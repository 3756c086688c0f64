"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.schemas import Readiness, Status
from server.state import MetricsDep, RuntimeDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Status)
def healthz() -> Status:
    """200 while the process can answer at all, loading or not."""
    return Status(status="ok")


@router.get("/readyz", response_model=Readiness)
def readyz(runtime: RuntimeDep) -> Readiness:
    """200 once the base is loaded and warmed up; `get_runtime` answers 503 before that."""
    base = runtime.base
    return Readiness(status="ready", base=base.info()["base_model_name_or_path"], base_fingerprint=base.fingerprint,
                     device=runtime.device)


@router.get("/metrics")
def metrics(metrics: MetricsDep) -> Response:
    return Response(content=metrics.render(), media_type=metrics.content_type)
