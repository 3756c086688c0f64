"""headserve on a local Ray Serve instance: 2 replicas of the app behind Ray's proxy, one shared registry.

Proves the Ray path of issue 15: both replicas serve (the replica header names who answered) with the
same greedy text on /generate and /v1/completions, a head registered or deleted through the proxy is
served or refused by every replica on every later call, and readiness reaches Ray through `check_health`.
One Ray instance (2 CPUs, no dashboard, a small object store) for the module; about 30 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

# Ray as on a laptop: every Ray service on loopback, never the machine's other addresses (read when ray is imported;
# the processes Ray starts inherit it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray  # noqa: E402  (the `ray` extra, which `make test` installs)
from pydantic import ValidationError  # noqa: E402
from ray import serve  # noqa: E402

from heads.base import SHIPPED_HEADS  # noqa: E402
from server.errors import NotReadyError  # noqa: E402
from server.ray_app import DEPLOYMENT_NAME, REPLICA_HEADER, RaySettings, build_app, replica_settings, wait_ready  # noqa: E402
from server.settings import Settings  # noqa: E402

TOKEN = "ray-test-token"
READY_TIMEOUT_S = 120.0
ROUNDS = 10  # rounds of concurrent requests, until both replicas have answered (each is a coin toss for Ray)
GENERATE = {"prompt": "What is 12 plus 30?", "head": "math", "max_new_tokens": 12,
            "decoding": {"strategy": "greedy"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary registry both replicas share, holding the embedded base's committed `math` head."""
    root = tmp_path_factory.mktemp("ray-registry")
    shutil.copytree(SHIPPED_HEADS / "math", root / "math")
    return root


@pytest.fixture(scope="module")
def proxy(registry: Path) -> Iterator[httpx.Client]:
    """Ray's HTTP proxy on a free loopback port, in front of 2 ready replicas on the embedded base."""
    # Quiet, and small enough for CI.
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=80 * 1024 * 1024, log_to_driver=False, configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"replicas": 2, "num_cpus": 1, "heads_dir": str(registry), "admin_token": TOKEN,
                         "device": "cpu", "max_new_tokens": 32, "load_timeout_s": 60})
        serve.run(app, name="headserve", route_prefix="/", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            _wait_ready(client)
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass  # the proxy starts before the application is routed
        assert time.monotonic() < deadline, "the Ray application never became ready"
        time.sleep(0.25)


def _from_both_replicas(call: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """`call` concurrently, round after round, until two replicas have answered; every answer."""
    answers: list[httpx.Response] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(ROUNDS):
            answers += pool.map(lambda _: call(), range(4))
            if len({a.headers[REPLICA_HEADER] for a in answers}) == 2:
                return answers
    pytest.fail(f"only one replica answered in {len(answers)} requests: {answers[0].headers[REPLICA_HEADER]}")


def _texts(answers: list[httpx.Response], text: Callable[[Any], str]) -> set[str]:
    for answer in answers:
        assert answer.status_code == 200, answer.text
    return {text(answer.json()) for answer in answers}


@pytest.mark.slow
def test_ray_runs_two_healthy_replicas_through_check_health(proxy: httpx.Client) -> None:
    status = serve.status().applications["headserve"]
    deployment = status.deployments[DEPLOYMENT_NAME]
    assert (status.status, deployment.status) == ("RUNNING", "HEALTHY")
    assert deployment.replica_states == {"RUNNING": 2}
    ready = proxy.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.headers[REPLICA_HEADER]


@pytest.mark.slow
def test_generate_is_the_same_greedy_text_from_both_replicas(proxy: httpx.Client) -> None:
    answers = _from_both_replicas(lambda: proxy.post("/generate", json=GENERATE))
    texts = _texts(answers, lambda body: body["text"])
    assert len(texts) == 1 and texts != {""}


@pytest.mark.slow
def test_openai_completions_are_the_same_from_both_replicas(proxy: httpx.Client) -> None:
    request = {"model": "math", "prompt": GENERATE["prompt"], "max_tokens": 12, "temperature": 0}
    answers = _from_both_replicas(lambda: proxy.post("/v1/completions", json=request))
    assert len(_texts(answers, lambda body: body["choices"][0]["text"])) == 1


@pytest.mark.slow
def test_a_head_registered_through_the_proxy_is_served_by_every_replica(proxy: httpx.Client, registry: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    files = {"config": ("head_config.json", (registry / "math" / "head_config.json").read_bytes()),
             "weights": ("head.safetensors", (registry / "math" / "head.safetensors").read_bytes())}
    assert proxy.post("/heads", data={"name": "math2"}, files=files).status_code == 401  # the token is required
    created = proxy.post("/heads", data={"name": "math2"}, files=files, headers=auth)
    assert created.status_code == 201, created.text
    assert (registry / "math2" / "head.safetensors").is_file()  # written once, to the shared folder

    # Every later call, on either replica, knows it: listed, and serving what its weights (math's) give.
    listed = _from_both_replicas(lambda: proxy.get("/v1/models"))
    assert all("math2" in {m["id"] for m in answer.json()["data"]} for answer in listed)
    served = _texts(_from_both_replicas(lambda: proxy.post("/generate", json={**GENERATE, "head": "math2"})),
                    lambda body: body["text"])
    expected = proxy.post("/generate", json=GENERATE).json()["text"]
    assert served == {expected}

    assert proxy.delete("/heads/math2", headers=auth).status_code == 204
    gone = _from_both_replicas(lambda: proxy.post("/generate", json={**GENERATE, "head": "math2"}))
    assert {answer.status_code for answer in gone} == {404}


# Without Ray running: how the settings become deployment options, and the readiness rule Ray is given.

def test_fixed_replicas_take_a_full_batch_plus_queue_each() -> None:
    options = RaySettings(replicas=3, num_cpus=2).deployment_options(Settings(max_batch_size=8, max_queue=16))
    assert options == {"num_replicas": 3, "max_ongoing_requests": 24,
                       "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.0}}


def test_min_and_max_replicas_autoscale_on_one_batch_per_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADSERVE_RAY_MIN_REPLICAS", "1")
    monkeypatch.setenv("HEADSERVE_RAY_MAX_REPLICAS", "4")
    options = RaySettings().deployment_options(Settings(max_batch_size=8))
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}


@pytest.mark.parametrize("bad", [{"min_replicas": 1}, {"min_replicas": 3, "max_replicas": 2}, {"replicas": 0}])
def test_inconsistent_ray_settings_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        RaySettings(**bad)
    with pytest.raises(ValueError, match="invalid headserve Ray settings"):
        build_app({key: str(value) for key, value in bad.items()})


def test_a_bad_server_setting_stops_the_builder_not_the_replicas() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        build_app({"max_queue": "0"})


def test_replicas_count_as_reachable_from_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's proxy, not the app, binds the socket: anonymous registry writes stay refused whatever HOST says."""
    monkeypatch.setenv("HEADSERVE_HOST", "127.0.0.1")
    assert not replica_settings({"host": "127.0.0.1"}).listens_on_loopback


class _App:
    def __init__(self, runtime: object = None, load_error: str | None = None) -> None:
        self.state = type("State", (), {"runtime": runtime, "load_error": load_error})()


def test_health_check_waits_for_the_base_then_passes() -> None:
    app = _App()

    async def load_then_check() -> None:
        waiting = asyncio.ensure_future(wait_ready(app, time.monotonic() + 30))  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        assert not waiting.done()  # still loading: Ray must not route to this replica yet
        app.state.runtime = object()
        await asyncio.wait_for(waiting, 5)

    asyncio.run(load_then_check())


@pytest.mark.parametrize(("app", "why"), [(_App(load_error="OSError: no such file"), "failed to load: OSError"),
                                         (_App(), "still loading")])
def test_health_check_fails_on_a_failed_load_or_at_the_deadline(app: _App, why: str) -> None:
    with pytest.raises(NotReadyError, match=why):
        asyncio.run(wait_ready(app, time.monotonic() + 0.3))  # type: ignore[arg-type]
