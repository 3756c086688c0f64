"""The generation engine: one worker thread owns the model; request handlers only enqueue and await.

Why a single worker: the base is one set of weights on one device, and interleaving forward passes
from several threads would only add contention. Handlers validate, put a `GenerationJob` on a
bounded queue (full -> QueueFullError -> 429) and await an asyncio future the worker resolves.

Decoding is our own loop over the base's KV cache, not `model.generate`, because each step needs
the base's last hidden state so that a head (not the base's LM head) produces the logits. A job
becomes a group of `Sequence`s that share one prefill: the answer with the requested head and the
comparison decodes with the base's linear head. Each sequence carries everything that makes it
independent — its head, sampling settings, generator, stop conditions — so the continuous-batching
step (sequences joining and leaving between steps) can later mix sequences of different jobs; for
now the worker runs one job's group to completion, dropping finished rows from the cache as it goes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from heads.base import Base
from heads.sampling import SamplingParams, make_generator, sample
from server.errors import NotReadyError, QueueFullError
from server.head_cache import HeadCache
from server.metrics import BASE_LABEL, Metrics
from server.schemas import FinishReason

log = logging.getLogger(__name__)

COMPARISON_DECODERS = {"greedy": "linear_greedy", "top_k": "linear_top_k"}


@dataclass
class Sequence:
    """One decode stream over a shared prompt, with its own head, settings and stop conditions."""

    decoder: str  # metrics label: the strategy, or "linear_greedy" / "linear_top_k" for comparisons
    head_label: str  # the head's name, or "base" for the base's own linear head
    head: nn.Module | None  # None: the base's LM head; a strong reference, so eviction or deletion cannot pull it
    params: SamplingParams
    generator: torch.Generator | None  # per sequence, so its draws do not depend on what else is decoding
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)  # generated ids, including a final EOS
    logprobs: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each token was produced
    text: str = ""
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def reason(self) -> FinishReason:
        """Why the sequence ended; only asked once decoding is over."""
        if self.finish_reason is None:
            raise RuntimeError("the sequence is still decoding")
        return self.finish_reason

    def append(self, token_id: int, logprob: float, now: float, tokenizer: object, eos_id: int | None) -> None:
        """Record one token and decide whether the sequence ends here (EOS, a stop string, or length)."""
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.token_times.append(now)
        if eos_id is not None and token_id == eos_id:
            self.finish_reason = FinishReason.eos
        elif self.stop:
            # Decoding the whole continuation each step is cheap at these lengths and, unlike decoding
            # token by token, sees stop strings that straddle tokens or multi-byte characters.
            self.text = tokenizer.decode(self.token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = FinishReason.stop
                return
        if self.finish_reason is None and len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = FinishReason.length
        if self.finish_reason is not None:
            self.text = tokenizer.decode(self.token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]


@dataclass
class GenerationJob:
    """A validated request: token ids of the formatted prompt and how to continue it."""

    prompt_ids: list[int]
    head_name: str | None  # None: the base's linear head
    params: SamplingParams
    seed: int  # seeds the answer and the linear_top_k comparison alike
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    compare: tuple[str, ...] = ()  # from "greedy", "top_k"
    accepted_at: float = field(default_factory=time.perf_counter)


@dataclass
class JobResult:
    main: Sequence
    comparisons: list[Sequence]
    accepted_at: float
    started_at: float
    finished_at: float


QueueItem = tuple[GenerationJob, asyncio.AbstractEventLoop, "asyncio.Future[JobResult]"]


class Engine:
    def __init__(self, base: Base, head_cache: HeadCache, metrics: Metrics, max_queue: int) -> None:
        self.base, self.head_cache, self.metrics, self.max_queue = base, head_cache, metrics, max_queue
        self.eos_id: int | None = base.tokenizer.eos_token_id
        self._queue: queue.Queue[QueueItem | None] = queue.Queue()  # None tells the worker to stop
        self._lock = threading.Lock()  # makes "check the bound, then put" one step
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="headserve-engine", daemon=True)

    # -- called from the event loop -------------------------------------------------------------
    async def generate(self, job: GenerationJob) -> JobResult:
        """Enqueue and wait; raises QueueFullError at once when MAX_QUEUE requests are already waiting."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[JobResult] = loop.create_future()
        with self._lock:
            if self._stopping:
                raise NotReadyError("the server is shutting down")
            if self._queue.qsize() >= self.max_queue:
                raise QueueFullError(f"the generation queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.put((job, loop, future))
            self.metrics.queue_size.set(self._queue.qsize())
        return await future

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the current job finish, then fail whatever is still queued with 503."""
        with self._lock:
            self._stopping = True
            self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                _resolve(item[1], item[2], None, NotReadyError("the server is shutting down"))

    def warm_up(self) -> None:
        """One short decode through the real code path, so the first request pays no first-call costs."""
        prompt = self.base.tokenizer("Warm up")["input_ids"] or [self.eos_id or 0]
        job = GenerationJob(prompt_ids=list(prompt), head_name=None, params=SamplingParams(), seed=0,
                            max_new_tokens=2, compare=("top_k",))
        self._run(job)

    # -- the worker thread ----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self.metrics.queue_size.set(self._queue.qsize())
            job, loop, future = item
            if future.cancelled():  # the client went away while waiting
                continue
            try:
                result = self._run(job)
            except Exception as e:  # delivered to the handler; domain errors become 4xx, others a logged 500
                _resolve(loop, future, None, e)
                continue
            self._record(job, result)
            _resolve(loop, future, result, None)

    def _run(self, job: GenerationJob) -> JobResult:
        started = time.perf_counter()
        head = self.head_cache.get(job.head_name).module if job.head_name else None
        sequences = [Sequence(decoder=job.params.strategy, head_label=job.head_name or BASE_LABEL, head=head,
                              params=job.params, generator=self._generator(job.params, job.seed),
                              max_new_tokens=job.max_new_tokens, stop=job.stop)]
        for strategy in job.compare:
            params = SamplingParams(strategy=strategy, top_k=job.params.top_k, temperature=job.params.temperature)
            sequences.append(Sequence(decoder=COMPARISON_DECODERS[strategy], head_label=BASE_LABEL, head=None,
                                      params=params, generator=self._generator(params, job.seed),
                                      max_new_tokens=job.max_new_tokens, stop=job.stop))
        self._decode(job.prompt_ids, sequences)
        return JobResult(main=sequences[0], comparisons=sequences[1:], accepted_at=job.accepted_at,
                         started_at=started, finished_at=time.perf_counter())

    def _generator(self, params: SamplingParams, seed: int) -> torch.Generator | None:
        return None if params.strategy == "greedy" else make_generator(seed, self.base.device)

    @torch.inference_mode()
    def _decode(self, prompt_ids: list[int], sequences: list[Sequence]) -> None:
        """Prefill the prompt once, then step every unfinished sequence one token at a time."""
        base, device = self.base, self.base.device
        room = base.n_positions - len(prompt_ids)  # the whole sequence must fit the base context
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a {base.n_positions} context")
        for seq in sequences:
            seq.max_new_tokens = min(seq.max_new_tokens, room)
        out = base.hidden_states(torch.tensor([prompt_ids], device=device), use_cache=True)
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]  # hidden: (1, D)
        if len(sequences) > 1:  # every sequence continues the same prefill
            cache.batch_repeat_interleave(len(sequences))
            hidden = hidden.expand(len(sequences), -1)  # (N, D)
        active = list(sequences)
        while True:
            logits = self._logits(hidden, active)  # (n, V)
            now = time.perf_counter()
            for row, seq in enumerate(active):
                token, logprob = sample(logits[row:row + 1], seq.params, seq.generator)
                seq.append(int(token), float(logprob), now, base.tokenizer, self.eos_id)
            keep = [i for i, seq in enumerate(active) if not seq.finished]
            if not keep:
                return
            if len(keep) < len(active):  # finished rows leave the batch and the cache
                cache.batch_select_indices(torch.tensor(keep, device=device))
                active = [active[i] for i in keep]
            step_ids = torch.tensor([[seq.token_ids[-1]] for seq in active], device=device)  # (n, 1)
            out = base.hidden_states(step_ids, past_key_values=cache, use_cache=True)
            cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]  # (n, D)

    def _logits(self, hidden: Tensor, sequences: list[Sequence]) -> Tensor:
        """(n, D) hidden states -> (n, V) float32 logits, each row from its own sequence's head."""
        groups: dict[int, tuple[nn.Module | None, list[int]]] = {}
        for row, seq in enumerate(sequences):
            groups.setdefault(id(seq.head), (seq.head, []))[1].append(row)
        if len(groups) == 1:
            head = sequences[0].head
            return (self.base.linear_logits(hidden) if head is None else head.decode(hidden)).float()  # type: ignore[operator]
        logits = hidden.new_empty(hidden.shape[0], self.base.vocab_size, dtype=torch.float32)  # (n, V)
        for head, rows in groups.values():
            idx = torch.tensor(rows, device=hidden.device)
            part = self.base.linear_logits(hidden[idx]) if head is None else head.decode(hidden[idx])  # type: ignore[operator]
            logits[idx] = part.float()
        return logits

    def _record(self, job: GenerationJob, result: JobResult) -> None:
        main, label = result.main, result.main.head_label
        self.metrics.queue_wait.labels(head=label).observe(result.started_at - result.accepted_at)
        if main.token_times:
            self.metrics.time_to_first_token.labels(head=label).observe(main.token_times[0] - result.accepted_at)
        for earlier, later in zip(main.token_times, main.token_times[1:], strict=False):
            self.metrics.inter_token_latency.labels(head=label).observe(later - earlier)
        for seq in [main, *result.comparisons]:
            self.metrics.generated_tokens.labels(head=seq.head_label, decoder=seq.decoder).inc(len(seq.token_ids))


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[JobResult], result: JobResult | None,
             error: BaseException | None) -> None:
    """Hand a result to the awaiting handler from the worker thread (ignored if it stopped waiting)."""
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is already closed: nobody is waiting any more
        pass
