"""The server serves a `lowrank` head on the embedded base: hot-loaded from a registry folder or uploaded, its
greedy tokens are those of the head's own forward(), and a new one (zero correction) decodes as the base."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from heads import CONFIG_NAME, WEIGHTS_NAME, LowRankConfig, LowRankHead, save_head
from heads.base import EMBEDDED_BASE, Base, load_base
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready

TEMPLATE = "Problem: {problem}\nSolution:"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def base() -> Base:
    return load_base(str(EMBEDDED_BASE))


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")  # empty at start-up: every head here arrives while serving


@pytest.fixture(scope="module")
def client(heads_dir: Path) -> Iterator[TestClient]:
    settings = Settings(base_model=str(EMBEDDED_BASE), heads_dir=heads_dir, device="cpu", max_new_tokens=16)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def lowrank_head(base: Base, tied: bool, scale: float, seed: int = 0) -> LowRankHead:
    """A head whose correction has weights of std `scale` (0: as built, the base itself)."""
    torch.manual_seed(seed)
    head = LowRankHead(LowRankConfig(rank=8, tied=tied), vocab_size=base.vocab_size, n_embd=base.n_embd)
    if scale:
        with torch.no_grad():
            nn.init.normal_(head.up.weight, std=scale)
    return head.eval()


def generate(client: TestClient, head: str) -> dict[str, Any]:
    r = client.post("/generate", json={"prompt": "What is 17 + 25?", "head": head, "max_new_tokens": NEW_TOKENS,
                                       "ignore_eos": True, "return_logprobs": True, "compare": ["greedy"]})
    assert r.status_code == 200, r.text
    return r.json()


def forward_greedy(base: Base, head: LowRankHead | None, prompt: str) -> list[int]:
    """Greedy tokens recomputed from scratch each step through the head's forward(): no cache, no decode()."""
    ids = list(base.tokenizer(prompt)["input_ids"])
    out = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            hidden = base.hidden_states(torch.tensor([ids], device=base.device)).last_hidden_state[:, -1:]  # (1, 1, D)
            logits = hidden @ base.embeddings.T if head is None else head(hidden, base.embeddings)  # (1, 1, V)
            out.append(int(logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


def served_ids(answer: dict[str, Any]) -> list[int]:
    return [t["token_id"] for t in answer["logprobs"]]


@pytest.mark.parametrize("tied", [True, False])
def test_a_lowrank_head_dropped_into_the_registry_serves_its_own_tokens(client: TestClient, base: Base,
                                                                        heads_dir: Path, tied: bool) -> None:
    name = f"lowrank-{'tied' if tied else 'untied'}"
    head = lowrank_head(base, tied, scale=1.0)
    save_head(head, heads_dir / name, base.info(), task="math", prompt_template=TEMPLATE)
    summary = client.get(f"/heads/{name}").json()
    assert summary["status"] == "ready" and summary["type"] == "lowrank"
    assert summary["config"] == {"rank": 8, "tied": tied}

    answer = generate(client, name)
    assert answer["head"] == name and answer["prompt"] == "Problem: What is 17 + 25?\nSolution:"
    assert served_ids(answer) == forward_greedy(base, head, answer["prompt"])
    base_greedy = answer["comparisons"][0]
    assert base_greedy["decoder"] == "linear_greedy"
    assert answer["text"] != base_greedy["text"]  # the correction, not the base, chose the tokens
    assert client.get(f"/heads/{name}").json()["resident"] is True


def test_an_uploaded_new_lowrank_head_decodes_exactly_as_the_base(client: TestClient, base: Base,
                                                                  tmp_path: Path) -> None:
    """B = 0 and alpha = 1: the head is the base, so its greedy text is the base's linear greedy text."""
    save_head(lowrank_head(base, tied=True, scale=0.0), tmp_path / "fresh", base.info(), task="math",
              prompt_template=TEMPLATE)
    files = {"config": ("head_config.json", (tmp_path / "fresh" / CONFIG_NAME).read_bytes()),
             "weights": ("head.safetensors", (tmp_path / "fresh" / WEIGHTS_NAME).read_bytes())}
    r = client.post("/heads", data={"name": "lowrank-fresh"}, files=files)
    assert r.status_code == 201, r.text
    assert r.json()["type"] == "lowrank"

    answer = generate(client, "lowrank-fresh")
    assert answer["text"] == answer["comparisons"][0]["text"]
    assert served_ids(answer) == forward_greedy(base, None, answer["prompt"])
