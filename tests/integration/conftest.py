"""The app in process on the lively tiny base with one backward-attention head, `math`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import Base, load_base
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready

MATH_TEMPLATE = "Problem: {problem}\nSolution:"


@pytest.fixture(scope="module")
def lively_base(lively_base_dir: Path) -> Base:
    return load_base(str(lively_base_dir))


@pytest.fixture(scope="module")
def lively_client(lively_base_dir: Path, lively_base: Base,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """Ready to serve (MAX_NEW_TOKENS=64); the registry also holds `broken`, a folder that is no head."""
    heads_dir = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16), vocab_size=lively_base.vocab_size,
                                 n_embd=lively_base.n_embd)
    save_head(head, heads_dir / "math", lively_base.info(), task="math", prompt_template=MATH_TEMPLATE)
    (heads_dir / "broken").mkdir()
    settings = Settings(base_model=str(lively_base_dir), heads_dir=heads_dir, device="cpu", max_new_tokens=64)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def third_step_fails(lively_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's third base forward from now on raises (with a message no client may see)."""
    model = lively_client.app.state.runtime.engine.model  # type: ignore[attr-defined]
    real, calls = model.step, []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom /secret/path")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "step", failing)
