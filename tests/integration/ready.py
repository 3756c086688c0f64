"""Waiting for an in-process app to be ready: its base loads on a background thread after the lifespan starts."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    """Poll /readyz until 200; fail with the last readiness answer (why it is not ready) after `timeout`."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)
