# ruff: noqa: F811  (test arguments are named after the imported fixtures they receive)
"""Heads are checked by what they cost and compute before they serve: size and depth bombs and wrong
types are refused (uploads 422, hand-dropped ones listed invalid, never a 500), heads with absurd
logits are refused, a failed load is paid once, and no load ever keeps /healthz waiting."""

from __future__ import annotations

import json
import logging
import resource
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import server.head_cache as head_cache_module
from heads import CONFIG_NAME, WEIGHTS_NAME, BackwardAttentionConfig, BackwardAttentionHead, LinearHead, save_head
from heads.base import Base
from server.head_checks import MAX_ABS_LOGIT, HeadProbe
from tests.integration.test_server_heads import (  # noqa: F401  (the app fixtures of the heads API tests)
    TEMPLATE,
    base,
    client,
    head_files,
    heads_dir,
    make_client,
    snapshot,
    upload,
    write_head,
)

GB = 1024**3


def deep_json(depth: int) -> str:
    return '{"x": ' * (depth - 1) + "1" + "}" * (depth - 1)


def with_config(config_file: bytes, **changes: Any) -> bytes:
    """The config file with top-level fields replaced by raw JSON text (so any nesting can be written)."""
    raw = json.loads(config_file)
    for key in changes:
        raw[key] = f"@{key}@"
    text = json.dumps(raw)
    for key, value in changes.items():
        text = text.replace(f'"@{key}@"', value)
    return text.encode()


def scaled_head(base: Base, out: Path, kind: str, scale: float) -> Path:
    """A head whose weights are finite but scaled up: its logits reach about `scale` times normal.
    Past 1e30 every scaled weight is set to +-`scale` instead: still finite, but sums of them overflow."""
    torch.manual_seed(0)
    head: torch.nn.Module
    if kind == "linear":
        head = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd)
        scaled = [head.proj.weight]
    else:
        head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, residual=False),
                                     vocab_size=base.vocab_size, n_embd=base.n_embd)
        scaled = [head.query.weight]
    with torch.no_grad():
        for p in scaled:
            p.copy_(p.sign() * scale) if scale > 1e30 else p.mul_(scale)
    save_head(head, out, base.info(), task="math", prompt_template=TEMPLATE)
    return out


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_a_config_bomb_is_refused_quickly_without_allocating(client: TestClient, base: Base, heads_dir: Path,
                                                             tmp_path: Path) -> None:
    config, weights = head_files(base, tmp_path)
    bomb = with_config(config, config='{"latent_dim": 10000000, "num_heads": 2}')
    assert len(bomb) < 2048
    before, peak, start = snapshot(heads_dir), peak_rss_bytes(), time.monotonic()
    r = upload(client, "bomb", bomb, weights)
    assert time.monotonic() - start < 10  # was 13-17 s and 5 GB
    assert r.status_code == 422 and "latent_dim 10000000 is over the bound" in r.json()["detail"]
    assert peak_rss_bytes() - peak < 200 * 1024**2
    assert snapshot(heads_dir) == before


@pytest.mark.parametrize("field", ["config", "training"])
def test_json_nested_980_deep_is_422_and_nothing_is_saved(client: TestClient, base: Base, heads_dir: Path,
                                                           tmp_path: Path, field: str) -> None:
    config, weights = head_files(base, tmp_path)
    before = snapshot(heads_dir)
    r = upload(client, "deep", with_config(config, **{field: deep_json(980)}), weights)
    assert r.status_code == 422 and "nested deeper than" in r.json()["detail"]
    assert snapshot(heads_dir) == before
    assert client.get("/heads").status_code == 200


@pytest.mark.parametrize(("value", "fragment"), [("[]", "got list"), ("null", "got NoneType"),
                                                 ('{"latent_dim": "8"}', "latent_dim must be a positive")])
def test_a_config_of_the_wrong_type_is_422_on_upload(client: TestClient, base: Base, heads_dir: Path,
                                                     tmp_path: Path, value: str, fragment: str) -> None:
    config, weights = head_files(base, tmp_path)
    before = snapshot(heads_dir)
    r = upload(client, "typed", with_config(config, config=value), weights)
    assert r.status_code == 422 and fragment in r.json()["detail"]
    assert snapshot(heads_dir) == before


BAD_FOLDERS: dict[str, tuple[dict[str, str], str]] = {
    "config-list": ({"config": "[]"}, "'config' must be an object, got list"),
    "config-null": ({"config": "null"}, "'config' must be an object, got NoneType"),
    "config-deep": ({"config": deep_json(980)}, "nested deeper than"),
    "training-deep": ({"training": deep_json(980)}, "nested deeper than"),
    "nan-metric": ({"training": '{"loss": NaN}'}, "not valid JSON"),
    "config-bomb": ({"config": '{"latent_dim": 10000000}'}, "over the bound"),
}


def test_hand_dropped_bad_folders_are_listed_invalid_never_500(client: TestClient, base: Base,
                                                               heads_dir: Path) -> None:
    good = write_head(base, heads_dir / "good")
    for name, (changes, _) in BAD_FOLDERS.items():
        write_head(base, heads_dir / name)
        (heads_dir / name / CONFIG_NAME).write_bytes(with_config((good / CONFIG_NAME).read_bytes(), **changes))
    r = client.get("/heads")
    assert r.status_code == 200, r.text
    listed = {h["name"]: h for h in r.json()["heads"]}
    assert listed["good"]["status"] == "ready"
    for name, (_, fragment) in BAD_FOLDERS.items():
        assert listed[name]["status"] == "invalid" and fragment in listed[name]["error"], listed[name]
        assert listed[name]["bytes"] > 0 and listed[name]["config"] is None
        one = client.get(f"/heads/{name}")
        assert one.status_code == 200 and one.json()["status"] == "invalid"
        r = client.post("/generate", json={"prompt": "1 + 1", "head": name, "max_new_tokens": 2})
        assert r.status_code == 409 and fragment in r.json()["detail"], r.text
    assert client.get("/heads").json()["heads"] == list(listed.values())  # the same answer, from the cache
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models == ["base", "good"]


def test_bad_folders_are_logged_once_not_on_every_listing(client: TestClient, base: Base, heads_dir: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    write_head(base, heads_dir / "good")
    (heads_dir / "Bad Name").mkdir()  # not a valid head name
    (heads_dir / "no-config").mkdir()  # no head_config.json: not a head
    (heads_dir / "broken").mkdir()
    (heads_dir / "broken" / CONFIG_NAME).write_text("{oops")
    with caplog.at_level(logging.WARNING, logger="server.registry"):
        for _ in range(3):
            assert [h["name"] for h in client.get("/heads").json()["heads"]] == ["broken", "good"]
            assert client.post("/generate", json={"prompt": "x", "head": "broken"}).status_code == 409
    messages = [r.getMessage() for r in caplog.records if r.name == "server.registry"]
    for folder in ("'Bad Name'", "'no-config'", "'broken'"):
        assert sum(folder in m for m in messages) == 1, messages
    assert not any("'good'" in m for m in messages)


def test_an_oversized_weights_file_is_listed_invalid_without_being_read(client: TestClient, base: Base,
                                                                       heads_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_head(base, heads_dir / "huge")
    with open(heads_dir / "huge" / WEIGHTS_NAME, "ab") as f:
        f.truncate(2 * GB)  # sparse: 2 GB on paper for a head of a few KB
    loads = count_loads(monkeypatch)
    listed = client.get("/heads").json()["heads"]
    assert listed[0]["status"] == "invalid" and "take at most" in listed[0]["error"]
    start = time.monotonic()
    for _ in range(20):
        r = client.post("/generate", json={"prompt": "1 + 1", "head": "huge", "max_new_tokens": 2})
        assert r.status_code == 409 and "take at most" in r.json()["detail"]
    assert time.monotonic() - start < 30 and loads == []  # refused from its size, never read


@pytest.mark.parametrize("kind", ["linear", "backward_attention"])
@pytest.mark.parametrize(("scale", "fragment"), [(1e8, f"beyond the bound of {MAX_ABS_LOGIT:g}"),
                                                 (3e38, "not finite")])
def test_a_head_with_absurd_logits_is_refused_on_upload(client: TestClient, base: Base, heads_dir: Path,
                                                        tmp_path: Path, kind: str, scale: float, fragment: str) -> None:
    folder = scaled_head(base, tmp_path / "scaled", kind, scale)
    weights = (folder / WEIGHTS_NAME).read_bytes()
    before = snapshot(heads_dir)
    r = upload(client, "loud", (folder / CONFIG_NAME).read_bytes(), weights)
    assert r.status_code == 422 and fragment in r.json()["detail"] and "probe states" in r.json()["detail"], r.text
    assert snapshot(heads_dir) == before
    tame = scaled_head(base, tmp_path / "tame", kind, 1.0)  # the same head at its trained scale is fine
    assert upload(client, "tame", (tame / CONFIG_NAME).read_bytes(), (tame / WEIGHTS_NAME).read_bytes()
                  ).status_code == 201


def count_loads(monkeypatch: pytest.MonkeyPatch, gate: threading.Event | None = None,
                started: threading.Event | None = None) -> list[str]:
    """Record every head load from now on (optionally holding each until `gate` is set)."""
    calls: list[str] = []
    real = head_cache_module.load_head

    def counting(path: Path, **kwargs: Any) -> Any:
        calls.append(Path(path).name)
        if started is not None:
            started.set()
        if gate is not None:
            assert gate.wait(30)
        return real(path, **kwargs)

    monkeypatch.setattr(head_cache_module, "load_head", counting)
    return calls


def test_a_failed_load_is_paid_once_and_retried_when_the_files_change(client: TestClient, base: Base,
                                                                      heads_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    scaled_head(base, heads_dir / "loud", "linear", 1e8)  # hand-dropped: files fine, logits absurd
    assert client.get("/heads/loud").json()["status"] == "ready"  # not known until it is loaded
    loads = count_loads(monkeypatch)
    for _ in range(5):
        r = client.post("/generate", json={"prompt": "1 + 1", "head": "loud", "max_new_tokens": 2})
        assert r.status_code == 409 and "beyond the bound" in r.json()["detail"]
    assert loads == ["loud"]
    summary = client.get("/heads/loud").json()
    assert summary["status"] == "invalid" and "beyond the bound" in summary["error"]
    assert "loud" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    scaled_head(base, heads_dir / "loud", "linear", 1.0)  # fixed on disk: tried again, once
    for _ in range(3):
        r = client.post("/generate", json={"prompt": "1 + 1", "head": "loud", "max_new_tokens": 2})
        assert r.status_code == 200, r.text
    assert loads == ["loud", "loud"] and client.get("/heads/loud").json()["status"] == "ready"


def test_health_answers_while_a_slow_load_has_many_waiters(client: TestClient, base: Base, heads_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    write_head(base, heads_dir / "slow")
    gate, started = threading.Event(), threading.Event()
    loads = count_loads(monkeypatch, gate, started)
    results: list[int] = []
    waiters = [threading.Thread(target=lambda: results.append(client.post(
        "/generate", json={"prompt": "1 + 1", "head": "slow", "max_new_tokens": 2}).status_code)) for _ in range(60)]
    try:
        for w in waiters:
            w.start()
        assert started.wait(30)
        time.sleep(0.5)  # let every waiter reach the load
        for route in ("/healthz", "/readyz"):
            start = time.monotonic()
            assert client.get(route).status_code == 200
            assert time.monotonic() - start < 10  # answered, not queued behind the load (was 36 s)
    finally:
        gate.set()
        for w in waiters:
            w.join(60)
    assert results == [200] * 60 and loads == ["slow"]  # sixty requests, one load


def test_an_uploaded_head_is_probed_once_not_again_at_its_first_load(client: TestClient, base: Base, heads_dir: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload's probe covers the files it wrote; a hand edit afterwards is a new version, probed again."""
    probed: list[int] = []
    real = HeadProbe.check
    monkeypatch.setattr(HeadProbe, "check", lambda self, head: (probed.append(1), real(self, head))[1])
    loads = count_loads(monkeypatch)
    config, weights = head_files(base, tmp_path)
    assert upload(client, "once", config, weights).status_code == 201
    assert probed == [1]
    for _ in range(2):
        r = client.post("/generate", json={"prompt": "1 + 1", "head": "once", "max_new_tokens": 2})
        assert r.status_code == 200, r.text
    assert loads == ["once"] and probed == [1]
    (heads_dir / "once" / CONFIG_NAME).write_bytes(config)  # same bytes, new version of the file
    assert client.post("/generate", json={"prompt": "1 + 1", "head": "once", "max_new_tokens": 2}).status_code == 200
    assert loads == ["once", "once"] and probed == [1, 1]
