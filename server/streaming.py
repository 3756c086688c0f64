"""Token streaming: the engine's per-step progress as events an async handler iterates over.

The worker thread turns each new token into a `TokenEvent` carrying only the text that token
makes final: a token that ends inside a multi-byte character, or text that could still turn out
to be the start of a stop string, is held back until the next tokens settle it. So the text of a
stream's events, joined, is exactly the final `text` of the non-streaming answer.

`JobStream` submits one or more jobs together (an OpenAI request with a list of prompts) and
yields their events in order. Closing it, or simply dropping it (a client that disconnected
before the body started), marks its jobs abandoned; the engine frees their batch slots before
its next step. A non-streaming handler waits with `results_unless_disconnected`, which closes the
stream as soon as the client goes away, so a dropped connection frees its slots just as quickly.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.types import Receive

from server.classify import ClassifyResult
from server.engine import Engine
from server.errors import ClientDisconnectedError
from server.schemas import FinishReason
from server.sequence import Detokenizer, GenerationJob, JobResult, Pending, Sequence, Settle

T = TypeVar("T")

MAIN_DECODER = "main"  # the `decoder` of a job's answer in stream events; comparisons keep their names


@dataclass(frozen=True)
class TokenEvent:
    job: int  # the job's index in its stream (OpenAI's choice index)
    decoder: str  # "main" for the answer, else "linear_greedy" | "linear_top_k"
    token_id: int
    token: str  # the token on its own, for display
    text: str  # the text this token makes final; empty while it is held back
    logprob: float
    top: list[tuple[int, float]] | None  # most likely alternatives, when asked for
    finish_reason: FinishReason | None  # set on a sequence's last event


@dataclass(frozen=True)
class JobDone:
    job: int
    result: JobResult


@dataclass(frozen=True)
class JobFailed:
    job: int
    error: BaseException


StreamEvent = TokenEvent | JobDone | JobFailed


def stable_text(text: str, stop: tuple[str, ...]) -> str:
    """The part of a still-growing text that later tokens cannot change or cut.

    A trailing U+FFFD is an incomplete UTF-8 character; a trailing piece that begins a stop
    string may yet be cut away with it.
    """
    text = text.rstrip("\ufffd")
    held = 0
    for s in stop:
        for length in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:length]):
                held = length
                break
    return text[: len(text) - held]


class TextDeltas:
    """For one job: how much of each sequence's tokens and text its stream has been sent (worker thread)."""

    def __init__(self, job: int, tokenizer: Detokenizer) -> None:
        self.job, self.tokenizer = job, tokenizer
        self.tokens: dict[int, int] = {}
        self.chars: dict[int, int] = {}

    def events(self, sequences: list[Sequence]) -> list[TokenEvent]:
        out = []
        for k, seq in enumerate(sequences):
            sent = self.tokens.get(k, 0)
            if len(seq.token_ids) <= sent:
                continue
            if seq.finished:
                text = seq.text
            else:
                text = stable_text(self._decode(seq.token_ids), seq.stop)
            start = self.chars.get(k, 0)
            delta = text[start:] if len(text) > start else ""
            self.chars[k] = max(start, len(text))
            self.tokens[k] = len(seq.token_ids)
            decoder = MAIN_DECODER if k == 0 else seq.decoder
            new = range(sent, len(seq.token_ids))
            for i in new:
                last = i == new[-1]
                out.append(TokenEvent(job=self.job, decoder=decoder, token_id=seq.token_ids[i],
                                      token=self._decode([seq.token_ids[i]]), text=delta if last else "",
                                      logprob=seq.logprobs[i], top=seq.top[i] if i < len(seq.top) else None,
                                      finish_reason=seq.finish_reason if last else None))
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class JobStream:
    """Submit jobs together and iterate over their events; `JobDone`/`JobFailed` end each job's share.

    The engine only holds weak references to the stream, so a stream nobody iterates any more is
    abandoned as soon as it is garbage.
    """

    def __init__(self, engine: Engine, jobs: list[GenerationJob], *, tokens: bool = True) -> None:
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._left = len(jobs)
        self.closed = False
        loop, ref = asyncio.get_running_loop(), weakref.ref(self)
        try:
            for index, job in enumerate(jobs):
                progress = _progress(loop, ref, TextDeltas(index, engine.base.tokenizer)) if tokens else None
                engine.submit(Pending(job, _settle(loop, ref, index), _abandoned(ref), progress))
        except BaseException:
            self.close()  # 429 on the third prompt: the first two must not run for nobody
            raise

    def close(self) -> None:
        self.closed = True

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._left == 0:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, JobDone | JobFailed):
            self._left -= 1
        return event

    async def results(self) -> list[JobResult]:
        """Wait for every job; the first failure is raised."""
        done: dict[int, JobResult] = {}
        async for event in self:
            if isinstance(event, JobFailed):
                self.close()
                raise event.error
            if isinstance(event, JobDone):
                done[event.job] = event.result
        return [done[i] for i in sorted(done)]

    def _deliver(self, events: Iterable[StreamEvent]) -> None:
        for event in events:
            self._queue.put_nowait(event)


async def results_unless_disconnected(stream: JobStream, receive: Receive) -> list[JobResult]:
    """Every job's result, unless the client disconnects first (ASGI `receive` answers `http.disconnect`
    once the request body has been read): then the stream is closed, the engine frees its slots before
    its next step (and counts the request abandoned), and ClientDisconnectedError is raised."""
    return await unless_disconnected(asyncio.ensure_future(stream.results()), receive, stream.close)


async def unless_disconnected(work: asyncio.Future[T], receive: Receive, abandon: Callable[[], None]) -> T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled, `abandon` tells the
    engine to drop what it has not run yet, and ClientDisconnectedError is raised."""
    gone = asyncio.ensure_future(_disconnected(receive))
    either: set[asyncio.Future[Any]] = {work, gone}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise ClientDisconnectedError("the client disconnected before its answer was ready")
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            abandon()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # nothing else can arrive once the body is read; ignore it if it does


StreamRef = Callable[[], JobStream | None]


def _abandoned(ref: StreamRef) -> Callable[[], bool]:
    def abandoned() -> bool:
        stream = ref()
        return stream is None or stream.closed
    return abandoned


def _post(loop: asyncio.AbstractEventLoop, ref: StreamRef, events: Iterable[StreamEvent]) -> None:
    """Hand events from the worker thread to the stream's loop (dropped if the stream or loop is gone)."""
    def deliver() -> None:
        stream = ref()
        if stream is not None:
            stream._deliver(events)

    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


def _progress(loop: asyncio.AbstractEventLoop, ref: StreamRef, deltas: TextDeltas) -> Callable[[list[Sequence]], None]:
    def progress(sequences: list[Sequence]) -> None:
        if ref() is not None:
            events = deltas.events(sequences)
            if events:
                _post(loop, ref, events)
    return progress


def _settle(loop: asyncio.AbstractEventLoop, ref: StreamRef, index: int) -> Settle:
    def settle(result: JobResult | ClassifyResult | None, error: BaseException | None) -> None:
        if error is None and isinstance(result, JobResult):  # a generation's stream gets nothing else
            event: StreamEvent = JobDone(index, result)
        else:  # the engine settles with exactly one of the two; a job with neither fails rather than hangs
            event = JobFailed(index, error or RuntimeError("the job ended with neither a result nor an error"))
        _post(loop, ref, [event])
    return settle
