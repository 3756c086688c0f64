"""Token streaming: the events of `POST /generate` with `stream: true`, and abandoning a stream."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from heads.base import Base
from heads.sampling import SamplingParams
from server.engine import Engine
from server.metrics import Metrics
from server.sequence import GenerationJob, Sequence
from server.streaming import JobDone, JobStream, TextDeltas, TokenEvent, stable_text


def stream(lively_client: TestClient, **body: Any) -> list[Any]:
    """The payloads of a /generate stream, in order; the literal [DONE] is kept as a string."""
    with lively_client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    return [f if f == "[DONE]" else json.loads(f) for f in frames]


def text_of(events: list[Any], decoder: str) -> str:
    return "".join(e["text"] for e in events if isinstance(e, dict) and e.get("decoder") == decoder)


def test_stable_text_holds_back_partial_characters_and_possible_stop_strings() -> None:
    assert stable_text("abc\ufffd", ()) == "abc"
    assert stable_text("the answer is 4", ("is 42",)) == "the answer "
    assert stable_text("the answer is 4", ("xyz",)) == "the answer is 4"
    assert stable_text("xab", ("abc", "b")) == "x"  # the longest possible start of any stop string


def test_stream_events_add_up_to_the_non_streaming_answer(lively_client: TestClient) -> None:
    body = {"prompt": "Ava has 3 apples", "head": "math", "max_new_tokens": 20, "compare": True,
            "decoding": {"strategy": "top_k", "seed": 7}}
    whole = lively_client.post("/generate", json=body).json()
    events = stream(lively_client, **body)
    assert events[-1] == "[DONE]" and events[-2]["type"] == "done"
    done = events[-2]["response"]
    assert done["text"] == whole["text"] and done["tokens"] == whole["tokens"]
    tokens = [e for e in events if isinstance(e, dict) and e["type"] == "token"]
    assert {e["decoder"] for e in tokens} == {"main", "linear_greedy", "linear_top_k"}
    assert text_of(events, "main") == whole["text"]
    assert len([e for e in tokens if e["decoder"] == "main"]) == whole["tokens"]
    for comparison, streamed in zip(whole["comparisons"], ["linear_greedy", "linear_top_k"], strict=True):
        assert text_of(events, streamed) == comparison["text"]
        assert comparison["timings"]["first_token_s"] <= comparison["timings"]["total_s"]
    finals = [e for e in tokens if e["finish_reason"] is not None]
    assert sorted(e["decoder"] for e in finals) == ["linear_greedy", "linear_top_k", "main"]
    assert all(e["logprob"] <= 0 for e in tokens)


def test_a_stop_string_is_never_streamed(lively_client: TestClient) -> None:
    body = {"prompt": "Ben buys 12", "max_new_tokens": 30, "raw": True}
    free = lively_client.post("/generate", json=body).json()["text"]
    stop = free[len(free) // 2: len(free) // 2 + 3]
    assert len(stop) == 3, free
    events = stream(lively_client, prompt="Ben buys 12", max_new_tokens=30, raw=True, stop=[stop])
    done = events[-2]["response"]
    assert done["finish_reason"] == "stop" and stop not in done["text"]
    assert text_of(events, "main") == done["text"] == free[: free.index(stop)]


@pytest.mark.usefixtures("third_step_fails")
def test_an_engine_failure_mid_stream_arrives_as_an_error_event(lively_client: TestClient) -> None:
    events = stream(lively_client, prompt="Sam", max_new_tokens=10, ignore_eos=True)
    assert len([e for e in events if isinstance(e, dict) and e["type"] == "token"]) == 2
    assert events[-2] == {"type": "error", "status": 500, "detail": "internal server error"}
    assert events[-1] == "[DONE]"


def test_queue_full_is_a_429_before_the_stream_starts(lively_client: TestClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lively_client.app.state.runtime.engine, "max_queue", 0)  # type: ignore[attr-defined]
    r = lively_client.post("/generate", json={"prompt": "Sam", "stream": True})
    assert r.status_code == 429 and "queue is full" in r.json()["detail"] and r.headers["retry-after"]


def test_text_deltas_emit_one_event_per_token_with_the_text_it_settles(lively_base: Base) -> None:
    tokenizer = lively_base.tokenizer
    ids = tokenizer("Ava has 3 apples and 4 pears")["input_ids"]
    seq = Sequence(decoder="greedy", head_label="base", head=None, params=SamplingParams(), generator=None,
                   max_new_tokens=len(ids), stop=("pea",))
    deltas, events = TextDeltas(0, tokenizer), []
    for token in ids:
        if seq.finished:
            break
        seq.append(token, -0.5, 0.0, tokenizer, None)
        events += deltas.events([seq])
    assert len(events) == len(seq.token_ids)
    assert "".join(e.text for e in events) == seq.text == "Ava has 3 apples and 4 "
    assert events[-1].finish_reason is not None and all(e.finish_reason is None for e in events[:-1])


def _engine_with_step_counter(lively_base: Base) -> tuple[Engine, list[float]]:
    engine = Engine(lively_base, Metrics(), max_queue=8, max_batch_size=8, max_batch_tokens=4096)
    real, calls = engine.model.step, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.perf_counter())
        time.sleep(0.01)  # steps long enough that closing lands between two of them
        return real(*args, **kwargs)

    engine.model.step = counted  # type: ignore[method-assign]
    return engine, calls


@pytest.mark.parametrize("how", ["close", "drop"])
def test_an_abandoned_stream_frees_its_slot_within_one_step(lively_base: Base, how: str) -> None:
    engine, calls = _engine_with_step_counter(lively_base)
    engine.start()
    job = GenerationJob(prompt_ids=lively_base.tokenizer("Sam")["input_ids"], head=None, head_label="base",
                        params=SamplingParams(), seed=0, max_new_tokens=200, ignore_eos=True, compare=("greedy",))

    async def run() -> tuple[int, int]:
        stream = JobStream(engine, [job])
        async for event in stream:
            assert isinstance(event, TokenEvent)
            if len(calls) >= 3:
                break
        steps_at_close = len(calls)
        if how == "close":
            stream.close()
        else:
            del stream
            gc.collect()
        deadline = time.monotonic() + 10
        while engine._active and time.monotonic() < deadline:  # noqa: ASYNC110 - the engine is a thread
            await asyncio.sleep(0.005)
        return steps_at_close, len(calls)

    try:
        at_close, at_end = asyncio.run(run())
        assert not engine._active and engine.metrics.abandoned_requests._value.get() == 1
        assert at_end - at_close <= 1, f"{at_end - at_close} steps ran after the stream was abandoned"
        assert at_end < 50
    finally:
        engine.stop()


def test_several_jobs_share_one_stream_and_each_ends_once(lively_base: Base) -> None:
    engine = Engine(lively_base, Metrics(), max_queue=8, max_batch_size=8, max_batch_tokens=4096)
    engine.start()
    prompts = [lively_base.tokenizer(t)["input_ids"] for t in ("Sam", "Ava has 3 apples")]
    jobs = [GenerationJob(prompt_ids=p, head=None, head_label="base", params=SamplingParams(), seed=0,
                          max_new_tokens=n) for p, n in zip(prompts, (5, 9), strict=True)]

    async def run() -> list[Any]:
        return [event async for event in JobStream(engine, jobs)]

    try:
        events = asyncio.run(run())
    finally:
        engine.stop()
    done = {e.job: e.result for e in events if isinstance(e, JobDone)}
    assert sorted(done) == [0, 1]
    for index, result in done.items():
        mine = [e for e in events if isinstance(e, TokenEvent) and e.job == index]
        assert "".join(e.text for e in mine) == result.main.text
        assert [e.token_id for e in mine] == result.main.token_ids
