"""The generation engine: continuous batching of every request, head and comparison over one base.

One worker thread owns the model; request handlers validate, prepare the head, enqueue a
`GenerationJob` and wait for the events the worker posts back (`server.streaming.JobStream`: the
finished result, and every step's new tokens for a streaming request). Each engine step is one forward pass of
the base (its ragged runner's `step`, runtime.runners) over all active sequences: the prompts of newly
admitted jobs and one token for every sequence already decoding. The step's final hidden states are split by head
and each head's `decode` runs once for its group; then every sequence draws its own token with
its own generator, so its output does not depend on its neighbours (a beam-search job's beams, one
sequence each, choose their tokens together: server/beams.py). Sequences join between
steps (admission) and leave as soon as they finish (their cache slot is reused), like LoRAX or
vLLM serving many adapters over one base. A classification (server/classify.py) is a prompt with no sequence:
it holds no slot, and is scored and settled in the step that admits it.

Admission is strictly first-come, first-served: a job waits only while the batch has no room
for it (MAX_BATCH_SIZE sequences, MAX_BATCH_TOKENS tokens per step), and no later arrival ever
overtakes it. A job too big for an empty batch still runs alone rather than never.

One request never fails another. What belongs to one sequence (its head's logits or a head that
raises, its sampling, its stop strings and detokenisation; server/next_tokens.py) fails that
sequence's job alone: the job is marked failed, its sequences leave at the end of the step, and
everyone else's tokens are drawn exactly as if it had never been there. A base forward that fails
with newcomers in it is run again without them, then each newcomer alone: a newcomer that fails
alone fails its own job, the others join as usual, so a new request cannot poison the ones already
decoding. A forward that fails with no newcomer in it, or again without them, means the base itself
is failing: then every job in the step fails (newcomers too). Every job taken from the queue is
settled exactly once, whatever fails (abandoned ones are dropped unanswered: nobody listens).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import torch
from torch import Tensor

from heads.base import Base
from heads.sampling import SamplingParams, make_generator
from runtime.batch_decode import new_token_budget
from runtime.runners import Prefill, runner_for
from server.beams import advance_beams, answer_of, job_width, open_beams
from server.classify import Classifications, ClassifyJob, ClassifyResult, prefill_for
from server.errors import GenerationFailedError, NotReadyError, QueueFullError
from server.job_metrics import count_failure, record_result
from server.metrics import Metrics
from server.next_tokens import draw_tokens
from server.schemas import BASE_LABEL, COMPARE_ALL, MAX_BEAMS
from server.sequence import GenerationJob, JobResult, Pending, Running, Sequence, Settle
from server.torch_threads import pin_threads

log = logging.getLogger(__name__)

COMPARISON_DECODERS = {"greedy": "linear_greedy", "top_k": "linear_top_k"}
IDLE_CACHE_POSITIONS = 256  # an idle engine keeps a KV cache this long and frees a longer one


class Engine:
    def __init__(self, base: Base, metrics: Metrics, *, max_queue: int, max_batch_size: int,
                 max_batch_tokens: int) -> None:
        self.base, self.metrics = base, metrics
        self.max_queue, self.max_batch_size, self.max_batch_tokens = max_queue, max_batch_size, max_batch_tokens
        self.eos_id: int | None = base.tokenizer.eos_token_id
        self.model = runner_for(base.model)  # by config.model_type: GPT-2 or Llama family
        # A job brings up to MAX_BEAMS + len(COMPARE_ALL) sequences, and one job always fits an empty batch.
        self.cache = self.model.new_cache(max(max_batch_size, MAX_BEAMS + len(COMPARE_ALL)))
        self._waiting: collections.deque[Pending] = collections.deque()
        self._cond = threading.Condition()  # guards _waiting and _stopping; wakes the idle worker
        self._stopping = False
        self._active: list[Sequence] = []  # active[i] lives in cache slot i (worker thread only)
        self._owner: dict[int, Running] = {}  # id(sequence) -> its job
        self._admitting: list[Running] = []  # taken from the queue but not yet in _active/_owner (worker only)
        self.classify = Classifications(base)  # the step's classifications: prefills that decode nothing
        self._thread = threading.Thread(target=self._work, name="headserve-engine", daemon=True)
        self.threads = torch.get_num_threads()  # read before head loads set theirs to 1; pinned by the worker

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
        with self._cond:  # atomic with stop(): a stopped engine never starts a worker behind its back
            if self._stopping:
                raise RuntimeError("the engine was stopped; it cannot start again")
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
            pending.answer(None, NotReadyError("the server is shutting down"))

    def run_until_done(self, jobs: list[GenerationJob]) -> list[JobResult]:
        """Run jobs to completion in the calling thread, batched together, as the worker would; for warm-up
        and tests, never with the worker running. Raises the first job's error if any job failed."""
        if self._thread.is_alive():
            raise RuntimeError("run_until_done cannot run beside the worker thread")
        results: dict[int, JobResult] = {}
        errors: list[BaseException] = []

        def settler(index: int) -> Settle:
            def settle(result: JobResult | ClassifyResult | None, error: BaseException | None) -> None:
                if error is not None:
                    errors.append(error)
                elif isinstance(result, JobResult):
                    results[index] = result
            return settle

        with self._cond:
            self._waiting.extend(Pending(job, settler(i)) for i, job in enumerate(jobs))
        while self._waiting or self._active:
            self._tick()
        if errors:
            raise errors[0]
        return [results[i] for i in range(len(jobs))]

    def warm_up(self) -> None:
        """One short batched decode through the real code path, so the first request pays no first-call costs."""
        prompt = list(self.base.tokenizer("Warm up")["input_ids"]) or [self.eos_id or 0]
        jobs = [GenerationJob(prompt_ids=prompt, head=None, head_label=BASE_LABEL, params=SamplingParams(), seed=0,
                              max_new_tokens=2, compare=COMPARE_ALL) for _ in range(2)]
        served, self.metrics = self.metrics, Metrics()  # warm-up is not traffic: keep it out of /metrics
        try:
            self.run_until_done(jobs)
        finally:
            self.metrics = served

    # -- the worker thread ----------------------------------------------------------------------
    def _work(self) -> None:
        pin_threads(self.threads)
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._active:
                    return
            self._tick()

    def _tick(self) -> None:
        """One step; a failure nothing narrower caught fails the jobs in it, and the engine keeps serving."""
        try:
            self._step([] if self._stopping else self._admit())
        except Exception as e:
            log.exception("engine step failed")
            self._fail_active(e)

    def _admit(self) -> list[Running]:
        """Take waiting jobs, oldest first, while the batch has room for all their sequences and prompt."""
        admitted: list[Running] = []
        self._admitting = admitted  # from the moment a job leaves the queue, a failure still settles it
        free_slots = self.cache.slots - len(self._active)
        slot_budget = self.max_batch_size - len(self._active)
        token_budget = self.max_batch_tokens - len(self._active)  # every decoding sequence feeds one token
        with self._cond:
            while self._waiting:
                pending = self._waiting[0]
                if pending.gone():
                    self._waiting.popleft()
                    self.metrics.abandoned_requests.inc()
                    continue
                job = pending.job
                need = 0 if isinstance(job, ClassifyJob) else job_width(job)  # answer (or beams) and comparisons
                alone = not self._active and not admitted
                fits = need <= slot_budget and len(job.prompt_ids) <= token_budget
                if not (fits or (alone and need <= free_slots)):
                    break  # strict arrival order: nobody overtakes the job at the front
                self._waiting.popleft()
                try:
                    admitted.append(self._open(pending))
                except Exception as e:
                    log.exception("could not set up a job's sequences")
                    pending.answer(None, GenerationFailedError(f"the request could not be started "
                                                                 f"({type(e).__name__})"))
                    continue
                slot_budget -= need
                free_slots -= need
                token_budget -= len(job.prompt_ids)
            self.metrics.queue_size.set(len(self._waiting))
        return admitted

    def _open(self, pending: Pending) -> Running:
        """The sequences of a job: the answer with its head, then the comparison decodes with the base's (each
        recording the job's `top_logprobs` alternatives, which /generate streams for every decoder)."""
        if isinstance(pending.job, ClassifyJob):  # no sequence: it is scored in the step that admits it
            return Running(pending, [], started_at=time.perf_counter())
        job = pending.job
        max_new = new_token_budget(self.base.n_positions, len(job.prompt_ids), job.max_new_tokens)
        sequences = [Sequence(decoder=job.params.strategy, head_label=job.head_label, head=job.head,
                              params=job.params, generator=self._generator(job.params, job.seed),
                              max_new_tokens=max_new, stop=job.stop, ignore_eos=job.ignore_eos, end_ids=job.end_ids,
                              top_logprobs=job.top_logprobs)]
        for strategy in job.compare:
            params = SamplingParams(strategy=strategy, top_k=job.params.top_k, temperature=job.params.temperature)
            sequences.append(Sequence(decoder=COMPARISON_DECODERS[strategy], head_label=BASE_LABEL, head=None,
                                      params=params, generator=self._generator(params, job.seed),
                                      max_new_tokens=max_new, stop=job.stop, ignore_eos=job.ignore_eos,
                                      end_ids=job.end_ids, top_logprobs=job.top_logprobs))
        return open_beams(Running(pending, sequences, started_at=time.perf_counter()), self.eos_id)

    def _generator(self, params: SamplingParams, seed: int) -> torch.Generator | None:
        return None if params.is_greedy else make_generator(seed, self.base.device)

    def _step(self, admitted: list[Running]) -> None:
        """One base forward over every active sequence and the new prompts, then one token for each."""
        self._drop_abandoned()
        decoding = list(self._active)
        if not decoding and not admitted:
            return
        prefills, slot = [], len(decoding)
        for running in admitted:
            slots = list(range(slot, slot + len(running.sequences)))
            prefills.append(prefill_for(running.pending.job, slots))
            slot += len(slots)
            for seq in running.sequences:
                self._owner[id(seq)] = running
        # From here on the newcomers are part of the batch: whatever fails settles them with the others.
        batch = self._active = decoding + [seq for running in admitted for seq in running.sequences]
        self.classify.begin(admitted, prefills)
        self._admitting = []
        hidden = self._forward(decoding, admitted, prefills)  # (len(batch), D)
        self.classify.settle(self.metrics)
        self._next_tokens(hidden, batch)
        self._report_progress(batch)
        self._retire_finished()
        self.metrics.active_sequences.set(len(self._active))

    def _forward(self, decoding: list[Sequence], admitted: list[Running], prefills: list[Prefill]) -> Tensor:
        """The step's hidden states, one row per sequence of the batch; a failure with newcomers in it is
        retried without them (see `_recover`)."""
        try:
            hidden = self._run(decoding, prefills)
        except Exception as e:
            if not admitted:
                raise  # the sequences already decoding failed on their own: nobody else to blame
            log.exception("a step with %d new request(s) failed; retrying without them", len(admitted))
            hidden = self._recover(decoding, admitted, prefills, e)
        for seq in decoding:
            seq.cached += 1
        for running in admitted:
            for seq in running.sequences:
                seq.cached = len(running.pending.job.prompt_ids)
        return hidden

    def _run(self, decoding: list[Sequence], prefills: list[Prefill]) -> Tensor:
        """One base forward: (len(decoding) + every prefill's slots, D), a prefill's row repeated per slot."""
        self.cache.ensure(max([s.cached + 1 for s in decoding] + [len(p.token_ids) for p in prefills]))
        hidden = self.model.step(self.cache, [s.token_ids[-1] for s in decoding], [s.cached for s in decoding],
                                 prefills)  # (n_decode + n_prefill + n_mean, D)
        self.classify.collect(hidden, len(decoding), prefills)
        rows = list(range(len(decoding)))
        for i, prefill in enumerate(prefills):
            rows += [len(decoding) + i] * len(prefill.slots)
        if len(rows) != hidden.shape[0]:  # a prefill shared by comparison decodes feeds each of them
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=hidden.device)]
        return hidden

    def _recover(self, decoding: list[Sequence], admitted: list[Running], prefills: list[Prefill],
                 error: Exception) -> Tensor:
        """The sequences already decoding, without the newcomers (if that fails too, it fails them all),
        then each newcomer alone: one that fails alone fails its own job; the others join as usual.

        Cache writes are positional, so running a row again overwrites what the failed pass left.
        """
        parts = [self._run(decoding, [])] if decoding else []
        for running, prefill in zip(admitted, prefills, strict=True):
            part = None
            if decoding or len(admitted) > 1:  # else it already failed alone
                try:
                    part = self._run([], [prefill])
                except Exception as e:
                    log.exception("a new request's prompt failed on its own")
                    error = e
            if part is None:
                self._fail(running, error)
                part = torch.zeros(len(prefill.slots), self.base.n_embd, dtype=self.cache.dtype,
                                   device=self.cache.device)  # placeholder rows: a failed job draws nothing
            parts.append(part)
        return torch.cat(parts)

    def _next_tokens(self, hidden: Tensor, batch: list[Sequence]) -> None:
        """Each head's decode once for its rows, then each sequence's own draw; failures stay with their owner."""
        groups: dict[int, list[int]] = {}
        for row, seq in enumerate(batch):
            if self._alive(seq):  # a newcomer whose prompt failed has no hidden state
                groups.setdefault(id(seq.head), []).append(row)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_heads.observe(len(groups))
        beam_logits = draw_tokens(self.base, hidden, batch, list(groups.values()), time.perf_counter(), self._alive,
                                  self._fail_sequence)
        advance_beams(beam_logits, batch, lambda seq: self._owner[id(seq)], self.cache, self.base.tokenizer,
                      self._fail, time.perf_counter())

    def _alive(self, seq: Sequence) -> bool:
        return self._owner[id(seq)].error is None

    def _fail_sequence(self, seq: Sequence, error: BaseException) -> None:
        """One sequence failed: its whole job ends (the answer and its comparisons), nobody else's."""
        self._fail(self._owner[id(seq)], error)

    @staticmethod
    def _fail(running: Running, error: BaseException) -> None:
        """Mark the job failed (the first error wins); `_retire_finished` takes it out and settles it."""
        if running.error is None:
            running.error = error

    def _report_progress(self, batch: list[Sequence]) -> None:
        """Tell streaming callers about their jobs' new tokens; a failing callback never stops the batch."""
        told: set[int] = set()
        for seq in batch:
            running = self._owner[id(seq)]
            progress = running.pending.progress
            if progress is None or running.error is not None or id(running) in told:
                continue
            told.add(id(running))
            try:
                progress(running.sequences)
            except Exception:
                log.exception("a stream's progress callback failed")

    def _retire_finished(self) -> None:
        """Free the slots of finished (or failed) sequences and settle the jobs that have no sequence left."""
        for index in range(len(self._active) - 1, -1, -1):
            seq = self._active[index]
            if seq.finished or self._owner[id(seq)].error is not None:
                running = self._remove(index)
                if running.remaining == 0:
                    self._finish(running)

    def _drop_abandoned(self) -> None:
        """A caller that stopped waiting (a closed stream) frees its slots before the next forward."""
        dropped: set[int] = set()
        for index in range(len(self._active) - 1, -1, -1):
            running = self._owner[id(self._active[index])]
            if running.pending.gone():
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
        if running.error is not None:
            self._count_failure(running, running.error)
            running.pending.answer(None, running.error)
            return
        main, comparisons = answer_of(running)
        result = JobResult(main=main, comparisons=comparisons, accepted_at=running.pending.job.accepted_at,
                           started_at=running.started_at, finished_at=time.perf_counter(),
                           prompt_tokens=len(running.pending.job.prompt_ids))
        record_result(self.metrics, result)
        running.pending.answer(result, None)

    def _fail_active(self, error: BaseException) -> None:
        """Settle every job in the batch, and any taken from the queue but not yet in it, with `error`."""
        failed: dict[int, Running] = {}
        for running in [*self._owner.values(), *self._admitting, *self.classify.take()]:
            failed.setdefault(id(running), running)
        self._active, self._owner, self._admitting = [], {}, []
        self.cache.release()
        self.metrics.active_sequences.set(0)
        for running in failed.values():
            self._count_failure(running, running.error or error)
            running.pending.answer(None, running.error or error)

    def _count_failure(self, running: Running, error: BaseException) -> None:
        count_failure(self.metrics, running.pending.job.head_label, error)

