"""One request never fails another: each kind of hostile request or head, decoded among 8 bystanders.

Every test runs 8 bystander requests (greedy and seeded sampling, the `math` head and the base, with
and without comparisons, some streaming) in the same engine steps as one hostile request, and checks
that each bystander gets exactly the answer it gets alone and that the hostile one gets a clear one:
a tiny temperature decodes greedily (200), a head with non-finite logits or a decode that raises is
the head's fault (409 naming it), a poisoned forward or a failing detokenisation fails the hostile
request alone (500). Streaming callers get the same error as an event, then [DONE]. Later tests
drive the engine directly: failures outside any one sequence still settle every job exactly once,
a non-streaming client that disconnects frees its slots, and a shutdown during start-up never
leaves an engine running.
"""

from __future__ import annotations

import asyncio
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
from starlette.types import Message
from torch import Tensor, nn

from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import Base
from heads.sampling import SamplingParams
from server.app import create_app, load_runtime
from server.engine import Engine, Pending
from server.errors import GenerationFailedError, HeadOutputError
from server.factored import FactoredHead
from server.metrics import Metrics
from server.sequence import GenerationJob, JobResult, Sequence
from server.settings import Settings

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


# -- the engine driven directly -------------------------------------------------------------------

class ConstantHead(nn.Module):
    """A head whose every logit is `value` (NaN, inf ...), or whose decode raises when `value` is None."""

    def __init__(self, vocab_size: int, value: float | None) -> None:
        super().__init__()
        self.vocab_size, self.value = vocab_size, value

    def decode(self, hidden: Tensor) -> Tensor:
        if self.value is None:
            raise RuntimeError("decode failed")
        return torch.full((hidden.shape[0], self.vocab_size), self.value)


@dataclass
class Recorder:
    """Everything a caller was told, to check that each job is settled exactly once."""

    calls: list[tuple[JobResult | None, BaseException | None]]

    def __call__(self, result: JobResult | None, error: BaseException | None) -> None:
        self.calls.append((result, error))


def make_job(base: Base, i: int, **kw: Any) -> GenerationJob:
    strategy = "greedy" if i % 2 == 0 else "top_p"
    settings: dict[str, Any] = {"prompt_ids": list(base.tokenizer(PROMPTS[i % 8])["input_ids"]), "head": None,
                                "head_label": "base", "params": SamplingParams(strategy=strategy, top_p=0.8),
                                "seed": 7 + i, "max_new_tokens": 12, "ignore_eos": True,
                                "compare": ("greedy", "top_k") if i % 3 == 0 else (), "top_logprobs": 2}
    return GenerationJob(**{**settings, **kw})


def tokens(result: JobResult) -> list[list[int]]:
    return [s.token_ids for s in [result.main, *result.comparisons]]


def drain(engine: Engine, jobs: list[GenerationJob]) -> list[Recorder]:
    """Submit the jobs together and step the engine in this thread until it is idle."""
    recorders = [Recorder([]) for _ in jobs]
    for job, recorder in zip(jobs, recorders, strict=True):
        engine.submit(Pending(job, recorder))
    while engine._waiting or engine._active:
        engine._tick()
    assert not engine._owner and not engine._admitting
    return recorders


@pytest.mark.parametrize(("value", "error"), [(float("nan"), "non-finite"), (float("inf"), "non-finite"),
                                              (None, "decode raised")])
def test_a_head_with_bad_output_fails_only_its_jobs_in_the_engine(lively_base: Base, value: float | None,
                                                                   error: str) -> None:
    engine = Engine(lively_base, Metrics(), max_queue=64, max_batch_size=32, max_batch_tokens=4096)
    bystanders = [make_job(lively_base, i) for i in range(8)]
    reference = [tokens(r) for r in engine.run_until_done([make_job(lively_base, i) for i in range(8)])]
    bad = make_job(lively_base, 0, head=ConstantHead(lively_base.vocab_size, value), head_label="bad")
    recorders = drain(engine, [*bystanders[:4], bad, *bystanders[4:]])
    assert [len(r.calls) for r in recorders] == [1] * 9
    results = [r.calls[0] for r in recorders]
    (result, failure), others = results[4], results[:4] + results[5:]
    assert result is None and isinstance(failure, HeadOutputError) and "'bad'" in str(failure)
    assert error in str(failure)
    assert [tokens(r) for r, e in others if e is None and r is not None] == reference


def test_a_failure_outside_any_sequence_settles_every_admitted_job_once(lively_base: Base,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`_drop_abandoned` raising used to lose the jobs just taken from the queue; now each hears the error."""
    engine = Engine(lively_base, Metrics(), max_queue=64, max_batch_size=32, max_batch_tokens=4096)
    first = Recorder([])
    engine.submit(Pending(make_job(lively_base, 0, max_new_tokens=30), first))
    engine._tick()  # decoding now
    drop, calls = engine._drop_abandoned, []

    def broken() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bookkeeping failed")
        drop()

    monkeypatch.setattr(engine, "_drop_abandoned", broken)
    recorders = drain(engine, [make_job(lively_base, i) for i in range(1, 4)])
    for recorder in [first, *recorders]:
        assert len(recorder.calls) == 1
        result, error = recorder.calls[0]
        assert result is None and str(error) == "bookkeeping failed"
    assert drain(engine, [make_job(lively_base, 1)])[0].calls[0][1] is None  # and the engine serves on


def test_a_job_that_cannot_start_or_be_answered_costs_nobody_else(lively_base: Base,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(lively_base, Metrics(), max_queue=64, max_batch_size=32, max_batch_tokens=4096)
    reference = [tokens(r) for r in engine.run_until_done([make_job(lively_base, i) for i in (1, 2)])]
    generator = engine._generator

    def picky(params: SamplingParams, seed: int) -> Any:
        if seed == 666:
            raise RuntimeError("no generator for you")
        return generator(params, seed)

    monkeypatch.setattr(engine, "_generator", picky)
    unlucky = make_job(lively_base, 1, seed=666)
    deaf = Pending(make_job(lively_base, 3), lambda result, error: 1 / 0)  # type: ignore[arg-type,return-value]
    engine.submit(deaf)
    recorders = drain(engine, [make_job(lively_base, 1), unlucky, make_job(lively_base, 2)])
    assert isinstance(recorders[1].calls[0][1], GenerationFailedError)
    assert [tokens(r.calls[0][0]) for r in (recorders[0], recorders[2])] == reference  # type: ignore[arg-type]


def test_a_sequence_never_records_a_number_json_cannot_carry(lively_base: Base) -> None:
    seq = Sequence(decoder="greedy", head_label="base", head=None, params=SamplingParams(), generator=None,
                   max_new_tokens=4)
    for bad in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="non-finite"):
            seq.append(5, bad, 0.0, lively_base.tokenizer, None)
        with pytest.raises(ValueError, match="non-finite"):
            seq.add_top([5, 6], [-0.1, bad])
    assert seq.token_ids == [] and seq.logprobs == [] and seq.top == []


# -- disconnects and shutdown ---------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"prompt": "Sam", "head": "math", "max_new_tokens": 64, "ignore_eos": True, "compare": True}),
    ("/v1/completions", {"model": "math", "prompt": ["Sam", "Ava has"], "max_tokens": 64, "temperature": 0})])
def test_a_non_streaming_client_that_disconnects_frees_its_slots(lively_client: TestClient, engine: Engine,
                                                                 monkeypatch: pytest.MonkeyPatch, path: str,
                                                                 body: dict[str, Any]) -> None:
    """Driven through the app's ASGI interface, with a client that goes away while its request decodes."""
    if path.startswith("/v1"):  # no ignore_eos there: both prompts must really decode all 64 tokens
        choices = lively_client.post(path, json=body).json()["choices"]
        assert [c["finish_reason"] for c in choices] == ["length", "length"]
    step, steps = engine.model.step, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        steps.append(1)
        time.sleep(0.02)  # steps long enough that the disconnect lands between two of them
        return step(*args, **kwargs)

    monkeypatch.setattr(engine.model, "step", counted)
    abandoned_before = engine.metrics.abandoned_requests._value.get()
    sent_body = json.dumps(body).encode()

    async def run() -> tuple[int, int, list[Message]]:
        gone, sent, read = asyncio.Event(), [], False

        async def receive() -> Message:
            nonlocal read
            if not read:
                read = True
                return {"type": "http.request", "body": sent_body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
                 "raw_path": path.encode(), "root_path": "", "scheme": "http", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
                 "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "state": {}}
        app = lively_client.app
        request = asyncio.ensure_future(app(scope, receive, send))
        while len(steps) < 3:  # noqa: ASYNC110 - the engine is a thread
            await asyncio.sleep(0.002)
        at_disconnect = len(steps)
        gone.set()
        await asyncio.wait_for(request, 10)
        deadline = time.monotonic() + 10
        while engine._active and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        return at_disconnect, len(steps), sent

    at_disconnect, at_end, sent = asyncio.run(run())
    jobs = 1 if path == "/generate" else 2
    assert not engine._active and engine.metrics.abandoned_requests._value.get() == abandoned_before + jobs
    assert at_end - at_disconnect <= 1, f"{at_end - at_disconnect} steps ran after the client went away"
    assert sent[0]["status"] == 499
    assert engine.metrics.active_sequences._value.get() == 0


def test_a_shutdown_during_start_up_never_leaves_an_engine_running(lively_base_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The lifespan sets `stopping` under the gate while the loader waits for it: the loader must not start."""
    app = create_app(Settings(base_model=str(lively_base_dir), heads_dir=tmp_path, device="cpu"))
    engines: list[Engine] = []
    warm_up = Engine.warm_up

    def noted(self: Engine) -> None:
        warm_up(self)
        engines.append(self)

    monkeypatch.setattr(Engine, "warm_up", noted)
    stopping, gate = threading.Event(), threading.Lock()
    with gate:  # the lifespan's shutdown begins just as the loader is ready to start the engine
        loader = threading.Thread(target=load_runtime, args=(app, stopping, gate))
        loader.start()
        _wait_for(lambda: bool(engines))
        stopping.set()
    loader.join(30)
    assert not loader.is_alive() and app.state.runtime is None
    assert not engines[0]._thread.is_alive() and engines[0]._thread.ident is None  # never started
    engines[0].stop()
    with pytest.raises(RuntimeError, match="stopped"):
        engines[0].start()
