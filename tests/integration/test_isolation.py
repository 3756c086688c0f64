"""One request never fails another: each kind of hostile request or head, decoded among 8 bystanders.

Every test runs 8 bystander requests (greedy and seeded sampling, the `math` head and the base, with
and without comparisons, some streaming) in the same engine steps as one hostile request, and checks
that each bystander gets exactly the answer it gets alone and that the hostile one gets a clear one:
a tiny temperature decodes greedily (200), a head with non-finite logits or a decode that raises is
the head's fault (409 naming it), a poisoned forward or a failing detokenisation fails the hostile
request alone (500). Streaming callers get the same error as an event, then [DONE]. The engine
driven directly, disconnects and shutdown are in test_engine_isolation.py.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import Tensor

from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import Base
from heads.factored import FactoredHead
from server.engine import Engine
from server.sequence import Sequence

MATH_TEMPLATE = "Problem: {problem}\nSolution:"  # as the `math` head of conftest.py
PROMPTS = ["Ava has 3 apples", "Ben buys 12 pens", "Tom has 14 boxes", "What is 96 - 17?", "Sam", "A farmer sells 7",
           "45 + 38 =", "Zoe reads 5 books"]
Outcome = tuple[Any, ...]  # ("ok", answer without timings) or ("error", status, detail)


def bystander(i: int) -> dict[str, Any]:
    """The i-th bystander: heads, strategies, comparisons and streaming all vary."""
    body: dict[str, Any] = {"prompt": PROMPTS[i], "max_new_tokens": 24, "ignore_eos": True,
                            "decoding": {"strategy": "greedy" if i % 2 == 0 else "top_k", "top_k": 20, "seed": 100 + i}}
    if i % 3 != 2:
        body["head"] = "math"
    if i % 4 == 0:
        body["compare"] = True
    if i in (1, 4, 7):
        body["stream"] = True
    return body


BYSTANDERS = [("/generate", bystander(i)) for i in range(8)]


def call(client: TestClient, path: str, body: dict[str, Any]) -> Outcome:
    """What a client of `path` learns, the same way for plain and streaming calls (timings left out)."""
    if not body.get("stream"):
        r = client.post(path, json=body)
        if r.status_code != 200:
            return "error", r.status_code, _detail(r.json())
        return "ok", _answer(path, r.json())
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return "error", r.status_code, _detail(json.loads(r.read()))
        frames = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert frames[-1] == "[DONE]", frames[-3:]
    last = json.loads(frames[-2])
    if path == "/generate":
        if last["type"] == "error":
            return "error", last["status"], last["detail"]
        assert last["type"] == "done"
        return "ok", _answer(path, last["response"])
    if "error" in last:
        return "error", last["error"]["code"], last["error"]["message"]
    texts: dict[int, str] = {}
    for frame in frames[:-1]:
        for choice in json.loads(frame)["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return "ok", [texts[i] for i in sorted(texts)]


def _detail(body: dict[str, Any]) -> str:
    return str(body["detail"] if "detail" in body else body["error"]["message"])


def _answer(path: str, body: dict[str, Any]) -> Any:
    if path != "/generate":
        return [c["text"] for c in body["choices"]]
    comparisons = [(c["decoder"], c["text"], c["tokens"]) for c in body["comparisons"] or []]
    return body["text"], body["tokens"], body["finish_reason"], comparisons


@dataclass
class Pace:
    """Makes requests meet in the engine: the next admission waits until `gather` requests are queued, and
    base forward number `hold_at` (counted from 1) until one is; either stops waiting once `settled` says
    the request it waits for was answered without reaching the engine (refused by validation, say)."""

    engine: Engine
    gather: int = 0
    hold_at: int = 0
    steps: int = 0
    settled: Callable[[], bool] = lambda: False


def _wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the requests never met in the engine"
        time.sleep(0.002)


def _await(condition: Callable[[], bool], seconds: float = 30) -> None:
    """`_wait_for` for the engine thread, which must never raise: a timeout just lets it go on."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.002)


@pytest.fixture
def engine(lively_client: TestClient) -> Engine:
    return lively_client.app.state.runtime.engine  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def pace(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Pace:
    state = Pace(engine)
    admit, step = engine._admit, engine.model.step

    def paced_admit() -> Any:
        if state.gather:
            _await(lambda: len(engine._waiting) >= state.gather - state.settled())
            state.gather = 0
        return admit()

    def paced_step(*args: Any, **kwargs: Any) -> Any:
        state.steps += 1
        if state.steps == state.hold_at:
            _await(lambda: len(engine._waiting) >= 1 or state.settled())
        return step(*args, **kwargs)

    monkeypatch.setattr(engine, "_admit", paced_admit)
    monkeypatch.setattr(engine.model, "step", paced_step)
    return state


@pytest.fixture(scope="module")
def alone(lively_client: TestClient) -> list[Outcome]:
    """Each bystander's answer when it is the only request."""
    return [call(lively_client, path, body) for path, body in BYSTANDERS]


def among_bystanders(client: TestClient, pace: Pace, hostile: tuple[str, dict[str, Any]],
                     later: bool = False) -> tuple[list[Outcome], Outcome]:
    """The bystanders' outcomes and the hostile one's, all decoded in the same steps: admitted together,
    or (`later`) the hostile one joining while the bystanders decode."""
    requests = [*BYSTANDERS, hostile]
    outcomes: list[Outcome | None] = [None] * len(requests)

    def run(i: int) -> None:
        outcomes[i] = call(client, *requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    pace.settled = lambda: outcomes[-1] is not None
    if later:
        pace.gather, pace.hold_at = len(BYSTANDERS), 3
        for t in threads[:-1]:
            t.start()
        _wait_for(lambda: pace.steps >= 3)  # the bystanders decode; the third step waits for the newcomer
        threads[-1].start()
    else:
        pace.gather = len(requests)
        for t in threads:
            t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None for o in outcomes), outcomes
    _wait_for(lambda: not pace.engine._active, 10)
    return outcomes[:-1], outcomes[-1]  # type: ignore[return-value]


def test_the_bystanders_really_differ(alone: list[Outcome]) -> None:
    assert all(o[0] == "ok" for o in alone)
    assert len({str(o[1]) for o in alone}) == len(alone)


@pytest.mark.parametrize("later", [False, True])
def test_a_tiny_temperature_decodes_greedily_and_harms_nobody(lively_client: TestClient, pace: Pace,
                                                               alone: list[Outcome], later: bool) -> None:
    body = {"prompt": "Ava has 3 apples", "head": "math", "max_new_tokens": 24, "ignore_eos": True}
    greedy = call(lively_client, "/generate", body)
    hostile = {**body, "decoding": {"strategy": "top_k", "temperature": 1e-38, "seed": 1}}
    bystanders, outcome = among_bystanders(lively_client, pace, ("/generate", hostile), later)
    assert bystanders == alone
    assert outcome == greedy


def test_a_comparison_inheriting_a_tiny_temperature_decodes_greedily(lively_client: TestClient, pace: Pace,
                                                                     alone: list[Outcome]) -> None:
    hostile = {"prompt": "Sam", "max_new_tokens": 24, "ignore_eos": True, "compare": True, "stream": True,
               "decoding": {"strategy": "greedy", "temperature": 1e-38}}
    bystanders, outcome = among_bystanders(lively_client, pace, ("/generate", hostile))
    assert bystanders == alone
    assert outcome[0] == "ok"
    text, _, _, comparisons = outcome[1]
    assert comparisons[0][:2] == ("linear_greedy", text)  # the base head, greedy, is the answer itself
    assert comparisons[1][1:] == comparisons[0][1:]  # linear_top_k at 1e-38 is greedy too


@pytest.mark.parametrize("stream", [False, True])
def test_v1_with_a_tiny_positive_temperature_decodes_greedily(lively_client: TestClient, pace: Pace,
                                                              alone: list[Outcome], stream: bool) -> None:
    body = {"model": "math", "prompt": ["Ava has 3", "Ben buys"], "max_tokens": 16, "seed": 5, "stream": stream}
    greedy = call(lively_client, "/v1/completions", {**body, "temperature": 0})
    bystanders, outcome = among_bystanders(lively_client, pace, ("/v1/completions", {**body, "temperature": 1e-38}))
    assert bystanders == alone
    assert outcome == greedy and greedy[0] == "ok"


@pytest.fixture
def huge_head(lively_client: TestClient, lively_base: Base) -> Iterator[str]:
    """A head with finite weights whose logits overflow, dropped into the registry by hand (an upload could
    refuse it)."""
    torch.manual_seed(0)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16), vocab_size=lively_base.vocab_size,
                                 n_embd=lively_base.n_embd)
    with torch.no_grad():
        head.query.weight.fill_(1e38)
        head.key.weight.fill_(1e38)
    heads_dir = Path(lively_client.app.state.settings.heads_dir)  # type: ignore[attr-defined]
    save_head(head, heads_dir / "huge", lively_base.info(), task="math", prompt_template=MATH_TEMPLATE)
    yield "huge"
    shutil.rmtree(heads_dir / "huge", ignore_errors=True)


@pytest.mark.parametrize(("stream", "later"), [(False, False), (True, False), (False, True)])
def test_a_head_whose_logits_overflow_fails_its_request_alone(lively_client: TestClient, pace: Pace,
                                                              alone: list[Outcome], huge_head: str, stream: bool,
                                                              later: bool) -> None:
    hostile = {"prompt": "Sam", "head": huge_head, "max_new_tokens": 24, "stream": stream, "compare": True,
               "decoding": {"strategy": "top_k", "seed": 3}}
    bystanders, outcome = among_bystanders(lively_client, pace, ("/generate", hostile), later)
    assert bystanders == alone
    # 409 from the engine (non-finite logits), or 422/409 if the head is refused before it runs at all.
    assert outcome[0] == "error" and outcome[1] in (409, 422) and "huge" in outcome[2], outcome


@pytest.mark.parametrize(("fault", "stream"), [("raises", False), ("raises", True), ("nan", False), ("nan", True)])
def test_a_head_that_fails_while_decoding_fails_its_request_alone(lively_client: TestClient, lively_base: Base,
                                                                  pace: Pace, alone: list[Outcome],
                                                                  monkeypatch: pytest.MonkeyPatch, fault: str,
                                                                  stream: bool) -> None:
    """A head that passed every check when it loaded, then raises or gives NaN logits in a decode step."""
    torch.manual_seed(1)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16), vocab_size=lively_base.vocab_size,
                                 n_embd=lively_base.n_embd)
    heads_dir = Path(lively_client.app.state.settings.heads_dir)  # type: ignore[attr-defined]
    save_head(head, heads_dir / "faulty", lively_base.info(), task="math", prompt_template=MATH_TEMPLATE)
    head_cache = lively_client.app.state.runtime.head_cache  # type: ignore[attr-defined]
    monkeypatch.setattr(head_cache, "materialize_after", 0)  # the module we break is the one that serves

    def raises(*args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError("the head exploded /secret/path")

    def nan(rows: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return torch.full((rows.shape[0], lively_base.vocab_size), float("nan"))

    module = head_cache.get("faulty").module
    factored = isinstance(module, FactoredHead)
    if fault == "raises":
        monkeypatch.setattr(module, "project" if factored else "decode", raises)
    else:
        monkeypatch.setattr(module, "combine" if factored else "decode", nan)
    try:
        hostile = {"prompt": "Sam", "head": "faulty", "max_new_tokens": 24, "stream": stream, "compare": True,
                   "decoding": {"strategy": "top_k", "seed": 3}}
        bystanders, outcome = among_bystanders(lively_client, pace, ("/generate", hostile))
    finally:
        shutil.rmtree(heads_dir / "faulty", ignore_errors=True)
    assert bystanders == alone
    reason = ("its decode raised RuntimeError" if fault == "raises" else
              "it produced non-finite logits (NaN or infinity), so no token can be drawn")
    assert outcome == ("error", 409, f"head 'faulty' cannot be served: {reason}")


@pytest.mark.parametrize(("stream", "later"), [(False, False), (True, True), (False, True)])
def test_a_forward_that_fails_is_retried_without_the_newcomer(lively_client: TestClient, pace: Pace,
                                                              alone: list[Outcome], engine: Engine,
                                                              monkeypatch: pytest.MonkeyPatch, stream: bool,
                                                              later: bool) -> None:
    """A prompt that breaks every forward it is in: the others decode on, it fails alone with a plain 500."""
    poison = list(engine.base.tokenizer("Problem: POISON\nSolution:")["input_ids"])
    step = engine.model.step

    def poisoned(cache: Any, ids: list[int], lengths: list[int], prefills: list[Any]) -> Any:
        if any(p.token_ids == poison for p in prefills):
            raise RuntimeError("poisoned at /secret/path")
        return step(cache, ids, lengths, prefills)

    monkeypatch.setattr(engine.model, "step", poisoned)
    hostile = {"prompt": "POISON", "head": "math", "max_new_tokens": 24, "stream": stream}
    bystanders, outcome = among_bystanders(lively_client, pace, ("/generate", hostile), later)
    assert bystanders == alone
    assert outcome == ("error", 500, "internal server error")


@pytest.mark.parametrize("stream", [False, True])
def test_a_detokenisation_error_fails_its_request_alone(lively_client: TestClient, pace: Pace,
                                                        alone: list[Outcome], monkeypatch: pytest.MonkeyPatch,
                                                        stream: bool) -> None:
    """The tokenizer's decode raises for one sequence only (the one with the marked stop string)."""

    class Exploding:
        def decode(self, *args: Any, **kwargs: Any) -> str:
            raise ValueError("cannot decode")

    append = Sequence.append

    def flaky(self: Sequence, token_id: int, logprob: float, now: float, tokenizer: object,
              eos_id: int | None) -> None:
        append(self, token_id, logprob, now, Exploding() if self.stop == ("@@@",) else tokenizer, eos_id)

    monkeypatch.setattr(Sequence, "append", flaky)
    hostile = {"prompt": "Sam", "max_new_tokens": 24, "stop": ["@@@"], "stream": stream}
    bystanders, outcome = among_bystanders(lively_client, pace, ("/generate", hostile))
    assert bystanders == alone
    assert outcome == ("error", 500, "decoding this request failed (ValueError); other requests were not affected")
