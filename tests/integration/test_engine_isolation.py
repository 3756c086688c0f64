"""One request never fails another, with the engine driven directly: failures outside any one sequence still
settle every job exactly once, a head with bad output fails only its jobs, a non-streaming client that
disconnects frees its slots, and a shutdown during start-up never leaves an engine running.
(The hostile-request-among-bystanders tests over HTTP are in test_isolation.py.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from starlette.types import Message
from torch import Tensor

from heads import HeadModule
from heads.base import Base
from heads.sampling import NonFiniteLogitsError, SamplingParams
from server.app import create_app, load_runtime
from server.engine import Engine, Pending
from server.errors import GenerationFailedError, HeadOutputError
from server.metrics import Metrics
from server.next_tokens import public_error
from server.sequence import GenerationJob, JobResult, Sequence
from server.settings import Settings
from tests.integration.test_isolation import PROMPTS, _wait_for

# -- the engine driven directly -------------------------------------------------------------------

class ConstantHead(HeadModule):
    """A head whose every logit is `value` (NaN, inf ...), or whose decode raises when `value` is None."""

    head_type = "constant-test-head"

    def __init__(self, vocab_size: int, value: float | None) -> None:
        super().__init__()
        self.vocab_size, self.value = vocab_size, value

    def forward(self, hidden: Tensor, embeddings: Tensor) -> Tensor:
        return self.decode(hidden.flatten(0, -2)).view(*hidden.shape[:-1], self.vocab_size)

    def prepare(self, embeddings: Tensor) -> None:
        pass

    def release(self) -> None:
        pass

    def decode(self, hidden_last: Tensor, base_logits: Tensor | None = None) -> Tensor:
        if self.value is None:
            raise RuntimeError("decode failed")
        return torch.full((hidden_last.shape[0], self.vocab_size), self.value)


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
    failed = {tuple(sample.labels.values()): sample.value for family in engine.metrics.failed_requests.collect()
              for sample in family.samples if sample.name.endswith("_total")}
    assert failed == {("bad", "head_output"): 1.0}  # counted once, under its head, and nobody else


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


def test_non_finite_logits_blame_the_head_that_made_them_never_the_base(lively_base: Base) -> None:
    """A head's NaN logits are the head's fault (409 naming it); the base's own are ours (500), not a head's."""
    def sequence(head: HeadModule | None, label: str) -> Sequence:
        return Sequence(decoder="greedy", head_label=label, head=head, params=SamplingParams(), generator=None,
                        max_new_tokens=4)

    error = NonFiniteLogitsError([0])
    own = public_error(sequence(ConstantHead(lively_base.vocab_size, float("nan")), "nan-head"), error)
    assert isinstance(own, HeadOutputError) and "'nan-head'" in str(own)
    base = public_error(sequence(None, "base"), error)
    assert isinstance(base, GenerationFailedError) and "base model" in str(base) and "head" not in str(base)


# -- disconnects and shutdown ---------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"prompt": "Sam", "head": "math", "max_new_tokens": 64, "ignore_eos": True, "compare": True}),
    ("/v1/completions", {"model": "math", "prompt": ["Sam", "Ava has"], "max_tokens": 64, "temperature": 0})])
def test_a_non_streaming_client_that_disconnects_frees_its_slots(lively_client: TestClient,
                                                                 monkeypatch: pytest.MonkeyPatch, path: str,
                                                                 body: dict[str, Any]) -> None:
    """Driven through the app's ASGI interface, with a client that goes away while its request decodes."""
    engine: Engine = lively_client.app.state.runtime.engine  # type: ignore[attr-defined]
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
