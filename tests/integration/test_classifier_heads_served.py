# ruff: noqa: F811  (test arguments are named after the imported fixtures they receive)
"""A classifier head in the registry is a head like any other to list, load, probe and upload, and never asked
to decode: generating with it is a clear 422 naming its kind (never a 500)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from heads import CONFIG_NAME, WEIGHTS_NAME, ClassifierConfig, ClassifierHead, LinearHead, save_head
from heads.base import Base
from tests.integration.test_server_heads import (  # noqa: F401  (the app fixtures of the heads API tests)
    TEMPLATE,
    base,
    heads_dir,
    make_client,
    upload,
    write_head,
)

LABELS = ["negative", "neutral", "positive"]


def write_classifier(base: Base, out: Path, scale: float = 1.0, hidden_dim: int | None = None) -> Path:
    torch.manual_seed(0)
    head = ClassifierHead(ClassifierConfig(LABELS, pooling="mean", hidden_dim=hidden_dim),
                          vocab_size=base.vocab_size, n_embd=base.n_embd)
    with torch.no_grad():
        head.out.weight.mul_(scale)
    save_head(head, out, base.info(), task="sentiment", prompt_template="Review: {problem}\nSentiment:")
    return out


@pytest.fixture
def client(make_client: Callable[..., TestClient], base: Base, heads_dir: Path) -> TestClient:
    write_classifier(base, heads_dir / "sentiment")
    write_head(base, heads_dir / "math")
    return make_client()


def test_a_classifier_is_listed_with_its_kind_and_loads_without_decoding(client: TestClient) -> None:
    listed = {h["name"]: h for h in client.get("/heads").json()["heads"]}
    assert listed["sentiment"]["status"] == "ready" and listed["sentiment"]["type"] == "classifier"
    assert listed["sentiment"]["config"]["labels"] == LABELS and listed["math"]["type"] == "backward_attention"
    described = client.get("/heads/sentiment")
    assert described.status_code == 200 and described.json()["task"] == "sentiment"
    loaded = client.app.state.runtime.head_cache.get("sentiment")  # type: ignore[attr-defined]
    assert isinstance(loaded.module, ClassifierHead) and loaded.meta.head_type == "classifier"


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"prompt": "A fine film.", "head": "sentiment", "max_new_tokens": 2}),
    ("/generate", {"prompt": "A fine film.", "head": "sentiment", "max_new_tokens": 2, "stream": True}),
    ("/v1/completions", {"model": "sentiment", "prompt": "A fine film.", "max_tokens": 2}),
])  # /v1/chat/completions builds its jobs through the same server.jobs.build_job (a chat base is needed to reach it)
def test_generating_with_a_classifier_is_a_422_naming_its_kind(client: TestClient, path: str,
                                                                body: dict[str, object]) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert "is a classifier head" in r.text and "cannot generate" in r.text
    ok = client.post("/generate", json={"prompt": "2 + 2?", "head": "math", "max_new_tokens": 2})
    assert ok.status_code == 200  # the server and its other heads carry on


def test_uploads_of_classifiers_are_probed_on_their_label_logits(client: TestClient, base: Base,
                                                                  tmp_path: Path) -> None:
    good = write_classifier(base, tmp_path / "good", hidden_dim=16)
    r = upload(client, "sentiment-v2", (good / CONFIG_NAME).read_bytes(), (good / WEIGHTS_NAME).read_bytes())
    assert r.status_code == 201, r.text
    assert r.json()["type"] == "classifier" and r.json()["config"]["hidden_dim"] == 16
    absurd = write_classifier(base, tmp_path / "absurd", scale=1e30)  # finite weights, logits far past any bound
    r = upload(client, "sentiment-v3", (absurd / CONFIG_NAME).read_bytes(), (absurd / WEIGHTS_NAME).read_bytes())
    assert r.status_code == 422 and "probe states" in r.json()["detail"]


def test_a_verbalizer_is_a_generative_head_that_still_generates(make_client: Callable[..., TestClient], base: Base,
                                                                 heads_dir: Path) -> None:
    save_head(LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings),
              heads_dir / "verbal", base.info(), task="sentiment", prompt_template=TEMPLATE,
              labels=["bad", "good"], label_token_ids=[5, 9])
    client = make_client()
    summary = client.get("/heads/verbal").json()
    assert summary["status"] == "ready" and summary["type"] == "linear"
    assert client.post("/generate", json={"prompt": "Nice.", "head": "verbal", "max_new_tokens": 2}).status_code == 200
