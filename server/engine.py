"""The generation engine: continuous batching of every request, head and comparison over one base.

One worker thread owns the model; request handlers validate, prepare the head, enqueue a
`GenerationJob` and wait for the events the worker posts back (`server.streaming.JobStream`: the
finished result, and every step's new tokens for a streaming request). Each engine step is one forward pass of
the base (`RaggedGPT2.step`) over all active sequences: the prompts of newly admitted jobs and
one token for every sequence already decoding. The step's final hidden states are split by head
and each head's `decode` runs once for its group; then every sequence draws its own token with
its own generator, so its output does not depend on its neighbours. Sequences join between
steps (admission) and leave as soon as they finish (their cache slot is reused), like LoRAX or
vLLM serving many adapters over one base.

Admission is strictly first-come, first-served: a job waits only while the batch has no room
for it (MAX_BATCH_SIZE sequences, MAX_BATCH_TOKENS tokens per step), and no later arrival ever
overtakes it. A job too big for an empty batch still runs alone rather than never.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.base import Base
from heads.sampling import SamplingParams, make_generator, sample, scaled_logits
from server.errors import NotReadyError, QueueFullError
from server.head_logits import group_logits
from server.metrics import Metrics
from server.ragged import Prefill, RaggedGPT2
from server.schemas import COMPARE_ALL
from server.sequence import GenerationJob, JobResult, Sequence

log = logging.getLogger(__name__)

COMPARISON_DECODERS = {"greedy": "linear_greedy", "top_k": "linear_top_k"}
IDLE_CACHE_POSITIONS = 256  # an idle engine keeps a KV cache this long and frees a longer one
Settle = Callable[[JobResult | None, BaseException | None], None]


@dataclass
class Pending:
    """A job with the way back to whoever waits for it."""

    job: GenerationJob
    settle: Settle  # called once, from the worker thread, with the result or the error
    abandoned: Callable[[], bool] = lambda: False  # the caller stopped waiting: skip or drop the job
    # Streaming callers: called from the worker after every step that gave the job new tokens, with its sequences.
    progress: Callable[[list[Sequence]], None] | None = None


@dataclass
class Running:
    """An admitted job: its sequences are (or were) in the batch."""

    pending: Pending
    sequences: list[Sequence]
    started_at: float
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = len(self.sequences)


class Engine:
    def __init__(self, base: Base, metrics: Metrics, *, max_queue: int, max_batch_size: int,
                 max_batch_tokens: int) -> None:
        self.base, self.metrics = base, metrics
        self.max_queue, self.max_batch_size, self.max_batch_tokens = max_queue, max_batch_size, max_batch_tokens
        self.eos_id: int | None = base.tokenizer.eos_token_id
        self.model = RaggedGPT2(base.model)
        # A job brings up to 1 + len(COMPARE_ALL) sequences, and one job always fits an empty batch.
        self.cache = self.model.new_cache(max(max_batch_size, 1 + len(COMPARE_ALL)))
        self._waiting: collections.deque[Pending] = collections.deque()
        self._cond = threading.Condition()  # guards _waiting and _stopping; wakes the idle worker
        self._stopping = False
        self._active: list[Sequence] = []  # active[i] lives in cache slot i (worker thread only)
        self._owner: dict[int, Running] = {}  # id(sequence) -> its job
        self._thread = threading.Thread(target=self._work, name="headserve-engine", daemon=True)

    # -- called from the event loop (server.streaming.JobStream submits and waits) -------------
    def submit(self, pending: Pending) -> None:
        with self._cond:
            if self._stopping:
                raise NotReadyError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the generation queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(pending)
            self.metrics.queue_size.set(len(self._waiting))
            self._cond.notify()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs already decoding, then fail whatever is still queued with 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for pending in waiting:
            pending.settle(None, NotReadyError("the server is shutting down"))

    def run_until_done(self, jobs: list[GenerationJob]) -> list[JobResult]:
        """Run jobs to completion in the calling thread, batched together; for warm-up and tests, never with
        the worker running."""
        if self._thread.is_alive():
            raise RuntimeError("run_until_done cannot run beside the worker thread")
        results: dict[int, JobResult] = {}
        errors: list[BaseException] = []

        def settler(index: int) -> Settle:
            def settle(result: JobResult | None, error: BaseException | None) -> None:
                if error is not None:
                    errors.append(error)
                elif result is not None:
                    results[index] = result
            return settle

        with self._cond:
            self._waiting.extend(Pending(job, settler(i)) for i, job in enumerate(jobs))
        while self._waiting or self._active:
            self._step(self._admit())
        if errors:
            raise errors[0]
        return [results[i] for i in range(len(jobs))]

    def warm_up(self) -> None:
        """One short batched decode through the real code path, so the first request pays no first-call costs."""
        prompt = list(self.base.tokenizer("Warm up")["input_ids"]) or [self.eos_id or 0]
        jobs = [GenerationJob(prompt_ids=prompt, head=None, head_label="base", params=SamplingParams(), seed=0,
                              max_new_tokens=2, compare=COMPARE_ALL) for _ in range(2)]
        served, self.metrics = self.metrics, Metrics()  # warm-up is not traffic: keep it out of /metrics
        try:
            self.run_until_done(jobs)
        finally:
            self.metrics = served

    # -- the worker thread ----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._active:
                    return
            try:
                self._step([] if self._stopping else self._admit())
            except Exception as e:  # a failed step fails the jobs in it; the engine keeps serving
                log.exception("engine step failed")
                self._fail_active(e)

    def _admit(self) -> list[Running]:
        """Take waiting jobs, oldest first, while the batch has room for all their sequences and prompt."""
        admitted: list[Running] = []
        free_slots = self.cache.slots - len(self._active)
        slot_budget = self.max_batch_size - len(self._active)
        token_budget = self.max_batch_tokens - len(self._active)  # every decoding sequence feeds one token
        with self._cond:
            while self._waiting:
                pending = self._waiting[0]
                if pending.abandoned():
                    self._waiting.popleft()
                    self.metrics.abandoned_requests.inc()
                    continue
                job = pending.job
                need = 1 + len(job.compare)
                alone = not self._active and not admitted
                fits = need <= slot_budget and len(job.prompt_ids) <= token_budget
                if not (fits or (alone and need <= free_slots)):
                    break  # strict arrival order: nobody overtakes the job at the front
                self._waiting.popleft()
                admitted.append(self._open(pending))
                slot_budget -= need
                free_slots -= need
                token_budget -= len(job.prompt_ids)
            self.metrics.queue_size.set(len(self._waiting))
        return admitted

    def _open(self, pending: Pending) -> Running:
        """The sequences of a job: the answer with its head, then the comparison decodes with the base's."""
        job = pending.job
        room = self.base.n_positions - len(job.prompt_ids)  # the whole sequence must fit the base context
        max_new = max(1, min(job.max_new_tokens, room))
        sequences = [Sequence(decoder=job.params.strategy, head_label=job.head_label, head=job.head,
                              params=job.params, generator=self._generator(job.params, job.seed),
                              max_new_tokens=max_new, stop=job.stop, ignore_eos=job.ignore_eos,
                              top_logprobs=job.top_logprobs)]
        for strategy in job.compare:
            params = SamplingParams(strategy=strategy, top_k=job.params.top_k, temperature=job.params.temperature)
            sequences.append(Sequence(decoder=COMPARISON_DECODERS[strategy], head_label="base", head=None,
                                      params=params, generator=self._generator(params, job.seed),
                                      max_new_tokens=max_new, stop=job.stop, ignore_eos=job.ignore_eos))
        return Running(pending, sequences, started_at=time.perf_counter())

    def _generator(self, params: SamplingParams, seed: int) -> torch.Generator | None:
        return None if params.strategy == "greedy" else make_generator(seed, self.base.device)

    def _step(self, admitted: list[Running]) -> None:
        """One base forward over every active sequence and the new prompts, then one token for each."""
        self._drop_abandoned()
        decoding = list(self._active)
        if not decoding and not admitted:
            return
        prefills, slot = [], len(decoding)
        for running in admitted:
            slots = list(range(slot, slot + len(running.sequences)))
            prefills.append(Prefill(running.pending.job.prompt_ids, slots))
            slot += len(slots)
            for seq in running.sequences:
                self._owner[id(seq)] = running
        # From here on the newcomers are part of the batch: a failing step fails their jobs too.
        batch = self._active = decoding + [seq for running in admitted for seq in running.sequences]
        self.cache.ensure(max([s.cached + 1 for s in decoding] + [len(p.token_ids) for p in prefills]))
        hidden = self.model.step(self.cache, [s.token_ids[-1] for s in decoding], [s.cached for s in decoding],
                                 prefills)  # (n_decode + n_prefill, D)
        rows = list(range(len(decoding)))
        for seq in decoding:
            seq.cached += 1
        for i, running in enumerate(admitted):
            for seq in running.sequences:
                seq.cached = len(running.pending.job.prompt_ids)
                rows.append(len(decoding) + i)
        if len(rows) != hidden.shape[0]:  # a prefill shared by comparison decodes feeds each of them
            hidden = hidden[torch.tensor(rows, device=hidden.device)]
        self._next_tokens(hidden, batch)
        self._report_progress(batch)
        self._retire_finished()
        self.metrics.active_sequences.set(len(self._active))

    def _next_tokens(self, hidden: Tensor, batch: list[Sequence]) -> None:
        """Each head's decode once for its rows, then each sequence's own draw."""
        groups: dict[int, list[int]] = {}
        for row, seq in enumerate(batch):
            groups.setdefault(id(seq.head), []).append(row)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_heads.observe(len(groups))
        now = time.perf_counter()
        heads = [seq.head for seq in batch]
        for rows, logits in group_logits(self.base, hidden, heads, list(groups.values())):
            greedy = [i for i, row in enumerate(rows) if batch[row].params.strategy == "greedy"]
            if greedy:  # one argmax for all greedy rows: row-wise, so the same as one row at a time
                ids, logprobs = sample(logits[greedy] if len(greedy) < len(rows) else logits, SamplingParams())
                for i, token, logprob in zip(greedy, ids.tolist(), logprobs.tolist(), strict=True):
                    batch[rows[i]].append(token, logprob, now, self.base.tokenizer, self.eos_id)
            for i, row in enumerate(rows):
                seq = batch[row]
                if seq.params.strategy != "greedy":
                    token, logprob = sample(logits[i:i + 1], seq.params, seq.generator)
                    seq.append(int(token), float(logprob), now, self.base.tokenizer, self.eos_id)
            for i, row in enumerate(rows):
                seq = batch[row]
                if seq.top_logprobs:  # from the distribution the token's own logprob comes from
                    top = F.log_softmax(scaled_logits(logits[i:i + 1], seq.params), dim=-1)[0].topk(seq.top_logprobs)
                    seq.top.append(list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))

    def _report_progress(self, batch: list[Sequence]) -> None:
        """Tell streaming callers about their jobs' new tokens; a failing callback never stops the batch."""
        told: set[int] = set()
        for seq in batch:
            running = self._owner[id(seq)]
            progress = running.pending.progress
            if progress is None or id(running) in told:
                continue
            told.add(id(running))
            try:
                progress(running.sequences)
            except Exception:
                log.exception("a stream's progress callback failed")

    def _retire_finished(self) -> None:
        """Free the slots of finished sequences and settle the jobs that have no sequence left."""
        for index in range(len(self._active) - 1, -1, -1):
            if self._active[index].finished:
                running = self._remove(index)
                if running.remaining == 0:
                    self._finish(running)

    def _drop_abandoned(self) -> None:
        """A caller that stopped waiting (a closed stream) frees its slots before the next forward."""
        dropped: set[int] = set()
        for index in range(len(self._active) - 1, -1, -1):
            running = self._owner[id(self._active[index])]
            if running.pending.abandoned():
                self._remove(index)
                dropped.add(id(running))
        if dropped:
            self.metrics.abandoned_requests.inc(len(dropped))
            self.metrics.active_sequences.set(len(self._active))

    def _remove(self, index: int) -> Running:
        """Take the sequence at `index` out of the batch; the last active sequence moves into its slot."""
        seq, last = self._active[index], len(self._active) - 1
        if index != last:
            moved = self._active[last]
            self.cache.move(last, index, moved.cached)
            self._active[index] = moved
        self._active.pop()
        running = self._owner.pop(id(seq))
        running.remaining -= 1
        if not self._active and self.cache.capacity > IDLE_CACHE_POSITIONS:
            self.cache.release()  # idle: give long-context buffers back
        return running

    def _finish(self, running: Running) -> None:
        main, *comparisons = running.sequences
        result = JobResult(main=main, comparisons=comparisons, accepted_at=running.pending.job.accepted_at,
                           started_at=running.started_at, finished_at=time.perf_counter(),
                           prompt_tokens=len(running.pending.job.prompt_ids))
        self._record(result)
        running.pending.settle(result, None)

    def _fail_active(self, error: BaseException) -> None:
        failed = {id(r): r for r in (self._owner[id(s)] for s in self._active)}
        self._active, self._owner = [], {}
        self.metrics.active_sequences.set(0)
        self.cache.release()
        for running in failed.values():
            running.pending.settle(None, error)

    def _record(self, result: JobResult) -> None:
        main, label = result.main, result.main.head_label
        self.metrics.queue_wait.labels(head=label).observe(result.started_at - result.accepted_at)
        if main.token_times:
            self.metrics.time_to_first_token.labels(head=label).observe(main.token_times[0] - result.accepted_at)
        for earlier, later in zip(main.token_times, main.token_times[1:], strict=False):
            self.metrics.inter_token_latency.labels(head=label).observe(later - earlier)
        for seq in [main, *result.comparisons]:
            self.metrics.generated_tokens.labels(head=seq.head_label, decoder=seq.decoder).inc(len(seq.token_ids))
