"""The engine's steps keep their cores however the head cache's threads set theirs (server/torch_threads.py).

torch's thread count is per thread, and a thread takes the count last set anywhere when it starts torch
work: the head cache computes on one thread, and the engine must not inherit that.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from heads.base import EMBEDDED_BASE, REPO_ROOT
from server.app import create_app
from server.settings import Settings
from server.torch_threads import pin_one_thread, pin_threads
from tests.integration.ready import wait_ready


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The process's setting is 2 for the test (CI and tests may run with OMP_NUM_THREADS=1), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def in_thread(work: Any) -> Any:
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(work()))
    thread.start()
    thread.join()
    return box[0]


def test_a_pinned_thread_keeps_its_count_when_another_sets_one(two_threads: None) -> None:
    pinned_ready, helper_done, results = threading.Event(), threading.Event(), []

    def engine() -> None:
        pin_threads(2)
        pinned_ready.set()
        helper_done.wait(10)
        results.append(torch.get_num_threads())

    worker = threading.Thread(target=engine)
    worker.start()
    pinned_ready.wait(10)
    assert in_thread(lambda: (pin_one_thread(), torch.ones(4).sum(), torch.get_num_threads())[-1]) == 1
    helper_done.set()
    worker.join()
    assert results == [2]
    # Unpinned, a thread starting torch work now takes the helper's 1: what pinning the engine prevents.
    assert in_thread(torch.get_num_threads) == 1


def test_steps_keep_their_cores_after_a_head_load(two_threads: None, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(REPO_ROOT / "registry" / "math", tmp_path / "heads" / "math")
    settings = Settings(base_model=str(EMBEDDED_BASE), heads_dir=tmp_path / "heads", device="cpu")
    with TestClient(create_app(settings)) as client:
        wait_ready(client, timeout=60)
        engine = client.app.state.runtime.engine  # type: ignore[attr-defined]
        seen: list[int] = []
        step = engine.model.step

        def watched(*args: Any) -> Any:
            seen.append(torch.get_num_threads())  # in the engine's worker thread
            return step(*args)

        monkeypatch.setattr(engine.model, "step", watched)
        r = client.post("/generate", json={"prompt": "1 + 1", "head": "math", "max_new_tokens": 3})
        assert r.status_code == 200
    assert engine.threads == 2 and seen and set(seen) == {2}
