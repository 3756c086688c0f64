"""Safe by default (issue 10, item 6): registry writes without ADMIN_TOKEN only on a loopback host.

The Dockerfile binds 0.0.0.0; without a token, anyone who could reach it could register or delete
heads. Now such a server refuses writes with 403 and says at start-up how to enable them.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr

from heads import CONFIG_NAME, WEIGHTS_NAME, BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import load_base
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def head_files(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = load_base(str(tiny_base_dir))
    torch.manual_seed(0)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8), vocab_size=base.vocab_size, n_embd=base.n_embd)
    folder = tmp_path_factory.mktemp("head") / "math"
    save_head(head, folder, base.info(), task="math")
    return {"config": (folder / CONFIG_NAME).read_bytes(), "weights": (folder / WEIGHTS_NAME).read_bytes()}


@pytest.fixture
def serve(tiny_base_dir: Path, tmp_path: Path, head_files: dict[str, bytes]) -> Iterator[Callable[..., TestClient]]:
    """A ready server on `host` (nothing binds: TestClient runs in process), its registry holding `math`."""
    opened: list[TestClient] = []

    def make(host: str, admin_token: str | None = None) -> TestClient:
        heads_dir = tmp_path / f"registry-{len(opened)}"
        (heads_dir / "math").mkdir(parents=True)
        (heads_dir / "math" / CONFIG_NAME).write_bytes(head_files["config"])
        (heads_dir / "math" / WEIGHTS_NAME).write_bytes(head_files["weights"])
        settings = Settings(base_model=str(tiny_base_dir), heads_dir=heads_dir, device="cpu", host=host,
                            admin_token=SecretStr(admin_token) if admin_token else None)
        client = TestClient(create_app(settings))
        client.__enter__()
        opened.append(client)
        wait_ready(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)
        shutil.rmtree(client.app.state.settings.heads_dir, ignore_errors=True)  # type: ignore[attr-defined]


def upload(client: TestClient, files: dict[str, bytes], name: str = "math2", token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post("/heads", data={"name": name}, headers=headers,
                       files={"config": ("head_config.json", files["config"]),
                              "weights": ("head.safetensors", files["weights"])})


def delete(client: TestClient, name: str = "math", token: str | None = None) -> Any:
    return client.delete(f"/heads/{name}", headers={"Authorization": f"Bearer {token}"} if token else {})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.internal"])
def test_without_a_token_a_public_host_refuses_writes(serve: Callable[..., TestClient], head_files: dict[str, bytes],
                                                      host: str) -> None:
    client = serve(host)
    for r in (upload(client, head_files), delete(client)):
        assert r.status_code == 403, r.text
        assert "HEADSERVE_ADMIN_TOKEN" in r.json()["detail"]
    names = [h["name"] for h in client.get("/heads").json()["heads"]]
    assert names == ["math"]  # nothing written, nothing deleted
    assert client.get("/heads/math").status_code == 200  # reads stay open
    r = client.post("/generate", json={"prompt": "1 + 1", "head": "math", "max_new_tokens": 2})
    assert r.status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "localhost"])
def test_without_a_token_a_loopback_host_allows_writes(serve: Callable[..., TestClient], head_files: dict[str, bytes],
                                                       host: str) -> None:
    client = serve(host)
    assert upload(client, head_files).status_code == 201
    assert delete(client).status_code == 204
    assert [h["name"] for h in client.get("/heads").json()["heads"]] == ["math2"]


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_with_a_token_every_host_requires_it(serve: Callable[..., TestClient], head_files: dict[str, bytes],
                                             host: str) -> None:
    client = serve(host, admin_token=TOKEN)
    assert upload(client, head_files).status_code == 401
    assert delete(client).status_code == 401
    assert upload(client, head_files, token="wrong").status_code == 403
    assert delete(client, token="wrong").status_code == 403
    assert upload(client, head_files, token=TOKEN).status_code == 201
    assert delete(client, token=TOKEN).status_code == 204


@pytest.mark.parametrize(("host", "token", "warned"), [
    ("0.0.0.0", None, True), ("127.0.0.1", None, False), ("0.0.0.0", TOKEN, False),
])
def test_start_up_says_how_to_enable_writes(tiny_base_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            host: str, token: str | None, warned: bool) -> None:
    settings = Settings(base_model=str(tmp_path / "no-base"), heads_dir=tmp_path / "heads", device="cpu", host=host,
                        admin_token=SecretStr(token) if token else None)
    with caplog.at_level(logging.WARNING, logger="server.app"), TestClient(create_app(settings)):
        pass
    lines = [r.getMessage() for r in caplog.records if "HEADSERVE_ADMIN_TOKEN" in r.getMessage()]
    assert bool(lines) is warned, lines
    if warned:
        assert host in lines[0] and "disabled" in lines[0]
