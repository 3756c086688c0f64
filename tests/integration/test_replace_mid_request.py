# ruff: noqa: F811  (test arguments are named after the imported fixtures they receive)
"""A head replaced between a request's metadata read and its load is served as the version loaded: its prompt
template, its kind and its labels, never the old version's template paired with the new weights."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from heads import LinearHead, save_head
from heads.base import Base
from tests.integration.test_classifier_heads_served import LABELS, write_classifier
from tests.integration.test_server_heads import (  # noqa: F401  (the app fixtures of the heads API tests)
    TEMPLATE,
    base,
    heads_dir,
    make_client,
    write_head,
)

NEW_TEMPLATE = "Q: {problem}\nA:"


def replace_on_first_load(client: TestClient, replace: Callable[[], Any]) -> list[str]:
    """Make the head cache run `replace` (a write to the registry folder) right before the first load it is asked
    for: exactly the window between the route's metadata read and its load."""
    cache = client.app.state.runtime.head_cache  # type: ignore[attr-defined]
    submit, asked = cache.submit, []

    def submit_after_replacing(name: str) -> Future[Any]:
        if not asked:
            replace()
        asked.append(name)
        return submit(name)

    cache.submit = submit_after_replacing
    return asked


def test_generate_formats_the_prompt_as_the_loaded_version_was_trained(make_client: Callable[..., TestClient],
                                                                      base: Base, heads_dir: Path) -> None:
    write_head(base, heads_dir / "math")
    client = make_client()
    asked = replace_on_first_load(client, lambda: save_head(
        LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings), heads_dir / "math",
        base.info(), task="math", prompt_template=NEW_TEMPLATE))
    r = client.post("/generate", json={"prompt": "2+2", "head": "math", "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == "Q: 2+2\nA:" and asked == ["math", "math"]  # planned again, loaded once more
    again = client.post("/generate", json={"prompt": "2+2", "head": "math", "max_new_tokens": 2})
    assert again.json()["prompt"] == "Q: 2+2\nA:"


def test_generate_refuses_a_head_replaced_by_a_classifier(make_client: Callable[..., TestClient], base: Base,
                                                          heads_dir: Path) -> None:
    write_head(base, heads_dir / "math")
    client = make_client()
    replace_on_first_load(client, lambda: write_classifier(base, heads_dir / "math"))
    r = client.post("/generate", json={"prompt": "2+2", "head": "math", "max_new_tokens": 2})
    assert r.status_code == 422 and "classifier head" in r.json()["detail"]


def test_classify_plans_again_for_a_verbalizer_replaced_by_a_classifier(make_client: Callable[..., TestClient],
                                                                        base: Base, heads_dir: Path) -> None:
    save_head(LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings),
              heads_dir / "sentiment", base.info(), task="sentiment", prompt_template=TEMPLATE,
              labels=["bad", "good"], label_token_ids=[5, 9])
    client = make_client()
    replace_on_first_load(client, lambda: write_classifier(base, heads_dir / "sentiment"))
    r = client.post("/classify", json={"head": "sentiment", "text": "A fine film."})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "classifier" and body["labels"] == LABELS
    assert body["results"][0]["prompt"] == "Review: A fine film.\nSentiment:"


def test_classify_with_an_unchanged_head_loads_once(make_client: Callable[..., TestClient], base: Base,
                                                    heads_dir: Path) -> None:
    write_classifier(base, heads_dir / "sentiment")
    client = make_client()
    asked = replace_on_first_load(client, lambda: None)
    r = client.post("/classify", json={"head": "sentiment", "text": "A fine film."})
    assert r.status_code == 200 and asked == ["sentiment"]
