"""`kill -9` of the server in the middle of uploads, replaces and deletes, then a restart.

The registry's promise: a name that exists before a replace exists at every instant during and
after it, also across a crash; nothing half-written is ever visible; and whatever temporary or
trash folders a crash leaves are cleaned up when the server starts again. Each round kills the
server at a random moment of a busy write loop, checks the folder as the crash left it, then
restarts the server on it and checks what it serves.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

import httpx
import pytest

from heads import load_head
from heads.base import load_base
from tests.e2e.serving import serve
from tests.e2e.test_server_process import make_head

pytestmark = pytest.mark.slow
ROUNDS = 4
KEPT = ("keep-a", "keep-b")  # replaced over and over: must survive every crash, whole


def write_loop(url: str, sources: list[Path], stop: threading.Event) -> None:
    """Replace the kept heads, register fresh ones and delete them again, until the server dies."""
    n = 0
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            n += 1
            source = sources[n % len(sources)]
            files = {"config": (source / "head_config.json").read_bytes(),
                     "weights": (source / "head.safetensors").read_bytes()}
            try:
                for name in (*KEPT, f"fresh-{n % 3}"):
                    http.post("/heads", params={"replace": "true"}, data={"name": name}, files=files)
                http.delete(f"/heads/fresh-{(n + 1) % 3}")
            except httpx.TransportError:
                return  # killed


def assert_whole(registry: Path, fingerprint: str) -> list[str]:
    """Every visible head folder loads completely; returns the visible names."""
    visible = sorted(p.name for p in registry.iterdir() if not p.name.startswith("."))
    for name in visible:
        load_head(registry / name, fingerprint=fingerprint)  # raises on anything half-written
    return visible


def test_kill_9_during_writes_loses_no_name_and_leaves_nothing_behind(lively_base_dir: Path, tmp_path: Path) -> None:
    registry = tmp_path / "heads"
    sources = [make_head(lively_base_dir, tmp_path / f"source-{i}", seed=i) for i in range(3)]
    for name in KEPT:
        make_head(lively_base_dir, registry / name)
    fingerprint = load_base(str(lively_base_dir)).fingerprint
    rng = random.Random(0)
    for round_ in range(ROUNDS):
        with serve(lively_base_dir, registry, tmp_path / f"server-{round_}.log") as running:
            stop = threading.Event()
            writer = threading.Thread(target=write_loop, args=(running.url, sources, stop))
            writer.start()
            threading.Event().wait(rng.uniform(0.2, 1.2))
            os.kill(running.pid, signal.SIGKILL)
            stop.set()
            writer.join(timeout=30)
        visible = assert_whole(registry, fingerprint)  # as the crash left it, before any clean-up
        assert set(KEPT) <= set(visible), visible
        with serve(lively_base_dir, registry, tmp_path / f"restart-{round_}.log") as running:
            listed = httpx.get(f"{running.url}/heads").json()["heads"]
            assert {h["name"] for h in listed} >= set(KEPT)
            assert all(h["status"] == "ready" for h in listed), listed
            for name in KEPT:
                answer = httpx.post(f"{running.url}/generate",
                                    json={"prompt": "1 + 1 =", "head": name, "max_new_tokens": 2}, timeout=30)
                assert answer.status_code == 200, answer.text
            leftovers = [p.name for p in registry.iterdir() if p.name.startswith(".") and p.is_dir()]
            assert leftovers == [], leftovers
