"""Readiness, metrics, the queue bound, the head cache, the catch-all error handler and the CLI."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import Base, load_base
from server import __main__ as cli
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready

TEMPLATE = "Problem: {problem}\nSolution:"
METRIC_NAMES = [
    "headserve_request_duration_seconds", "headserve_time_to_first_token_seconds",
    "headserve_inter_token_latency_seconds", "headserve_queue_wait_seconds", "headserve_generated_tokens_total",
    "headserve_requests_total", "headserve_head_load_seconds", "headserve_heads_resident", "headserve_queue_size",
    "headserve_head_loads_total",
]


@pytest.fixture(scope="module")
def base(tiny_base_dir: Path) -> Base:
    return load_base(str(tiny_base_dir))


def write_head(base: Base, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, residual=False), vocab_size=base.vocab_size,
                                 n_embd=base.n_embd)
    save_head(head, out, base.info(), task="math", prompt_template=TEMPLATE)
    return out


@pytest.fixture
def heads_dir(tmp_path: Path, base: Base) -> Path:
    root = tmp_path / "registry"
    write_head(base, root / "math", seed=0)
    write_head(base, root / "algebra", seed=1)
    return root


@pytest.fixture
def make_client(tiny_base_dir: Path, heads_dir: Path) -> Iterator[Callable[..., TestClient]]:
    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = Settings(**{"base_model": str(tiny_base_dir), "heads_dir": heads_dir, "device": "cpu",
                               "max_new_tokens": 8, **overrides})
        c = TestClient(create_app(settings))
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def metric_values(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics keyed by (sample name, labels)."""
    text = client.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def generate(client: TestClient, **body: Any) -> Any:
    return client.post("/generate", json={"prompt": "What is 1 + 1?", "max_new_tokens": 3, **body})


def test_health_and_readiness(make_client: Callable[..., TestClient], base: Base) -> None:
    client = make_client()
    assert client.get("/healthz").json() == {"status": "ok"}
    wait_ready(client)
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["device"] == "cpu"
    assert ready["base_fingerprint"] == base.fingerprint


def test_everything_that_needs_the_model_is_503_before_the_lifespan_ran(tiny_base_dir: Path, heads_dir: Path) -> None:
    app = create_app(Settings(base_model=str(tiny_base_dir), heads_dir=heads_dir, device="cpu"))
    client = TestClient(app)  # not entered: the lifespan (and so the base loading) never starts
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"detail": "the base model is still loading"}
    r = generate(client)
    assert r.status_code == 503 and "loading" in r.json()["detail"]
    assert client.get("/heads").status_code == 200  # the registry on disk needs no model
    assert client.get("/metrics").status_code == 200


def test_a_base_that_fails_to_load_keeps_readyz_at_503(make_client: Callable[..., TestClient],
                                                       tmp_path: Path) -> None:
    (tmp_path / "not-a-model").mkdir()
    client = make_client(base_model=str(tmp_path / "not-a-model"))
    deadline = time.monotonic() + 30
    while "failed" not in (detail := client.get("/readyz").json()["detail"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.get("/readyz").status_code == 503 and "failed to load" in detail
    assert client.get("/healthz").status_code == 200
    assert generate(client).status_code == 503


def test_queue_full_is_429_with_retry_after(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_queue=1)
    wait_ready(client)
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    busy, release = threading.Event(), threading.Event()
    original = runtime.engine.model.step

    def blocked(*args: Any, **kwargs: Any) -> Any:
        busy.set()
        release.wait(10)
        return original(*args, **kwargs)

    runtime.engine.model.step = blocked
    answers: list[Any] = []
    threads = [threading.Thread(target=lambda: answers.append(generate(client))) for _ in range(2)]
    try:
        threads[0].start()
        assert busy.wait(10)  # the worker holds the first request
        threads[1].start()
        deadline = time.monotonic() + 10
        while metric_values(client)[("headserve_queue_size", frozenset())] < 1:  # the second one waits
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = generate(client)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "queue is full" in r.json()["detail"]
    finally:
        release.set()
        for t in threads:
            t.join(10)
        runtime.engine.model.step = original
    assert [a.status_code for a in answers] == [200, 200]
    assert metric_values(client)[("headserve_queue_size", frozenset())] == 0


def test_unexpected_errors_are_a_plain_500(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    wait_ready(client)
    runtime = client.app.state.runtime  # type: ignore[attr-defined]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals at /srv/model.py line 12")

    original, runtime.engine.model.step = runtime.engine.model.step, broken
    try:
        r = generate(client)
        v1 = client.post("/v1/completions", json={"model": "base", "prompt": "Sam", "max_tokens": 2})
    finally:
        runtime.engine.model.step = original
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    assert v1.status_code == 500 and v1.json()["error"]["message"] == "internal server error"
    assert "secret" not in v1.text
    assert generate(client).status_code == 200  # the worker survived
    values = metric_values(client)
    key = ("headserve_requests_total", frozenset({("route", "/generate"), ("head", "base"), ("status", "500")}))
    assert values[key] == 1


def test_metrics_after_requests_name_every_series_and_head(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    wait_ready(client)
    math = generate(client, head="math", max_new_tokens=4).json()
    generate(client, compare=["top_k"], decoding={"strategy": "top_p", "seed": 1})
    text = client.get("/metrics").text
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    values = metric_values(client)
    tokens = "headserve_generated_tokens_total"
    assert values[(tokens, frozenset({("head", "math"), ("decoder", "greedy")}))] == math["tokens"] == 4
    assert values[(tokens, frozenset({("head", "base"), ("decoder", "top_p")}))] == 3
    assert values[(tokens, frozenset({("head", "base"), ("decoder", "linear_top_k")}))] == 3
    ok = frozenset({("route", "/generate"), ("head", "math"), ("status", "200")})
    assert values[("headserve_requests_total", ok)] == 1
    assert values[("headserve_request_duration_seconds_count", ok)] == 1
    assert values[("headserve_time_to_first_token_seconds_count", frozenset({("head", "math")}))] == 1
    assert values[("headserve_inter_token_latency_seconds_count", frozenset({("head", "math")}))] == 3
    assert values[("headserve_queue_wait_seconds_count", frozenset({("head", "base")}))] == 1
    assert values[("headserve_head_loads_total", frozenset({("head", "math")}))] == 1
    assert values[("headserve_head_load_seconds_count", frozenset())] == 1
    assert values[("headserve_heads_resident", frozenset())] == 1


def test_lru_cache_of_one_evicts_and_counts_loads(make_client: Callable[..., TestClient]) -> None:
    client = make_client(head_cache_size=1)
    wait_ready(client)
    for head in ("math", "algebra", "math", "math"):
        assert generate(client, head=head).status_code == 200
    values = metric_values(client)
    assert values[("headserve_head_loads_total", frozenset({("head", "math")}))] == 2  # evicted once, then hit
    assert values[("headserve_head_loads_total", frozenset({("head", "algebra")}))] == 1
    assert values[("headserve_head_load_seconds_count", frozenset())] == 3
    assert values[("headserve_heads_resident", frozenset())] == 1
    resident = {h["name"]: h["resident"] for h in client.get("/heads").json()["heads"]}
    assert resident == {"algebra": False, "math": True}


def test_a_head_replaced_on_disk_is_reloaded(make_client: Callable[..., TestClient], base: Base,
                                             heads_dir: Path) -> None:
    client = make_client()
    wait_ready(client)
    body = {"head": "math", "max_new_tokens": 8, "decoding": {"strategy": "top_k", "seed": 4}}
    first = generate(client, **body).json()["text"]
    assert generate(client, **body).json()["text"] == first  # served from the cache
    write_head(base, heads_dir / "math", seed=7)  # training writes a new version in place
    assert generate(client, **body).json()["text"] != first
    assert metric_values(client)[("headserve_head_loads_total", frozenset({("head", "math")}))] == 2


def test_cli_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli.uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("HEADSERVE_PORT", "9100")
    monkeypatch.setenv("HEADSERVE_MAX_QUEUE", "3")
    cli.main(["--host", "0.0.0.0", "--heads-dir", str(tmp_path / "reg"), "--base-model", "gpt2"])
    settings = seen["app"].state.settings
    assert (seen["host"], seen["port"]) == ("0.0.0.0", 9100)
    assert settings.heads_dir == tmp_path / "reg" and settings.base_model == "gpt2" and settings.max_queue == 3
    assert (tmp_path / "reg").is_dir()


def test_settings_defaults_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HEADSERVE_MAX_NEW_TOKENS", "HEADSERVE_MAX_QUEUE", "HEADSERVE_DTYPE", "HEADSERVE_ADMIN_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    s = Settings(device="cpu")
    assert (s.max_new_tokens, s.max_queue, s.head_cache_size, s.admin_token) == (256, 64, 8, None)
    assert s.prompt_token_limit(1024) == 512 and s.prompt_token_limit(256) == 255
    assert Settings(device="cpu", max_prompt_tokens=100).prompt_token_limit(1024) == 100
    with pytest.raises(ValidationError, match="cuda"):
        Settings(device="cpu", dtype="float16")
    monkeypatch.setenv("HEADSERVE_ADMIN_TOKEN", "tok")
    assert Settings(device="cpu").admin_token.get_secret_value() == "tok"  # type: ignore[union-attr]
