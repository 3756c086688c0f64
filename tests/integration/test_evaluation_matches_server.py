"""Evaluation decodes what the server serves: the same tokens for the same prompt, head and seed.

`training.evaluate` decodes the base's own head with training's default prompt style and each head with the
style it was trained with, through `training.decoding.generate`, batched; the server answers one request per
problem through the app in process. Greedy rows must match token for token, with the committed `math`
head and with the base's own LM head; sampled example i must match a request with `example_seed(seed, i)`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from heads import HeadModule, load_head
from heads.base import EMBEDDED_BASE, REPO_ROOT, Base, load_base
from heads.prompts import PromptStyle, training_style
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready
from training import synth
from training.decoding import Generation, example_seed, generate

MAX_NEW = 64
SEED = 11


@dataclass(frozen=True)
class Row:
    """A row as training.evaluate decodes it: its registry name (None: the base's head), head and prompt style."""

    name: str | None
    head: HeadModule | None
    style: PromptStyle


@pytest.fixture(scope="module")
def base() -> Base:
    return load_base(str(EMBEDDED_BASE))


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    shutil.copytree(REPO_ROOT / "registry" / "math", root / "math")
    return root


@pytest.fixture(scope="module")
def client(heads_dir: Path) -> Iterator[TestClient]:
    settings = Settings(base_model=str(EMBEDDED_BASE), heads_dir=heads_dir, device="cpu", max_new_tokens=64)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def rows(base: Base, heads_dir: Path) -> dict[str, Row]:
    head, meta = load_head(heads_dir / "math", fingerprint=base.fingerprint)
    return {"base": Row(None, None, training_style(base.tokenizer)), "math": Row("math", head, meta.prompt_style)}


@pytest.fixture(scope="module")
def problems() -> list[str]:
    return [row["problem"] for row in synth.generate(5, 2, "test")]


def evaluated(base: Base, spec: Row, problems: list[str], **decoding: Any) -> list[Generation]:
    """The row decoded as `training.evaluate` decodes it (batched, rows joining as others finish)."""
    tokenizer = base.tokenizer
    return generate(base, [spec.style.ids(p, tokenizer) for p in problems], head=spec.head, max_new_tokens=MAX_NEW,
                    seed=SEED, batch_size=2, end_ids=spec.style.end_ids(tokenizer), **decoding)


def served(client: TestClient, base: Base, spec: Row, problem: str, decoding: dict[str, Any]) -> dict[str, Any]:
    """One request: a head formats the problem itself; the base rows send evaluation's prompt text raw."""
    body: dict[str, Any] = {"max_new_tokens": MAX_NEW, "return_logprobs": True, "decoding": decoding}
    if spec.head is not None:
        body |= {"prompt": problem, "head": spec.name}
    else:
        body |= {"prompt": spec.style.text(problem, base.tokenizer), "raw": True}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    out["token_ids"] = [t["token_id"] for t in out["logprobs"]]
    return out


def assert_same(gens: list[Generation], answers: list[dict[str, Any]]) -> None:
    for gen, answer in zip(gens, answers, strict=True):
        assert gen.token_ids == answer["token_ids"]
        assert gen.text == answer["text"] and gen.finish_reason == answer["finish_reason"]


@pytest.mark.parametrize("row", ["base", "math"])
def test_greedy_evaluation_is_what_the_server_returns(client: TestClient, base: Base, rows: dict[str, Row],
                                                      problems: list[str], row: str) -> None:
    spec = rows[row]
    gens = evaluated(base, spec, problems)
    assert_same(gens, [served(client, base, spec, p, {"strategy": "greedy"}) for p in problems])
    assert "eos" in {g.finish_reason for g in gens}  # some answers end at EOS (kept), where the server's do
    assert len({g.n_tokens for g in gens}) > 1  # rows of different lengths: later prompts joined mid-run


def test_the_head_row_is_not_the_base_row(base: Base, rows: dict[str, Row], problems: list[str]) -> None:
    """So the comparison above would catch a server that ignored the head."""
    assert [g.token_ids for g in evaluated(base, rows["math"], problems)] != [
        g.token_ids for g in evaluated(base, rows["base"], problems)]


@pytest.mark.parametrize("row,temperature", [("base", 1.0), ("math", 0.7)])
def test_sampled_example_i_is_a_request_seeded_with_example_seed(
        client: TestClient, base: Base, rows: dict[str, Row], problems: list[str], row: str,
        temperature: float) -> None:
    spec = rows[row]
    gens = evaluated(base, spec, problems, strategy="top_k", top_k=50, temperature=temperature)
    answers = [served(client, base, spec, p, {"strategy": "top_k", "top_k": 50, "temperature": temperature,
                                              "seed": example_seed(SEED, i)}) for i, p in enumerate(problems)]
    assert_same(gens, answers)
    greedy = evaluated(base, spec, problems)
    assert [g.token_ids for g in gens] != [g.token_ids for g in greedy]  # it sampled
    alone = [generate(base, [spec.style.ids(problems[i], base.tokenizer)], head=spec.head, strategy="top_k", top_k=50,
                      temperature=temperature, max_new_tokens=MAX_NEW, seed=SEED, end_ids=spec.style.end_ids(
                          base.tokenizer))[0] for i in (0, 3)]
    # Alone in a run, an example is example 0: its draws follow the seed of its index, not of its neighbours.
    assert alone[0].token_ids == gens[0].token_ids
    assert alone[1].token_ids != gens[3].token_ids


def test_example_seeds_are_distinct_and_within_the_server_bound() -> None:
    seeds = {example_seed(s, i) for s in range(4) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert example_seed(3, 7) == example_seed(3, 7) != example_seed(7, 3)
