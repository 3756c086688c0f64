"""Beam search inside the continuous-batching engine: a job's beams are sequences of the batch.

Why inside and not a loop of its own: a beam request's `num_beams` beams each hold one cache slot and
one row of every engine step, so they share each base forward with everything else decoding, and a
beam costs what a decode row costs. After each step server/next_tokens.py hands back the beams'
logits and `BeamSearch.advance` runs one step of transformers' beam search (`GenerationMixin.
_beam_search`, transformers 5) with the same float32 tensor operations in the same order, so on the
same logits it keeps the same beams and gives the same answer, token for token
(tests/integration/test_beam_search.py holds it to `generate(num_beams=...)`). One step:

- each beam's log-softmax plus its running score (the first step starts every beam from the prompt,
  all but the first at -1e9, so only one copy of each continuation competes); the best
  `max(2, 1 + n_end) * num_beams` continuations over all beams, so that `num_beams` of them go on;
- a continuation that ends (EOS or another end token, a stop string, or the length budget) and ranks
  among the first `num_beams` is a finished hypothesis, scored sum(logprobs) / length **
  length_penalty (length counts generated tokens, the end token too); the `num_beams` best are kept;
- the best `num_beams` continuations that do not end become the beams; a beam that continues
  another beam's prefix takes that beam's keys/values into its own slot (`SlotKVCache.fork`);
- the search ends when no beam can still beat the worst kept hypothesis (transformers'
  `early_stopping`: False, True or "never" decide how that is judged), when every continuation ends,
  or when the length budget is spent. The answer is the best hypothesis.

Beam search is decided only at the end, so /generate refuses to stream it. A job's beam search that
fails (its head's logits are not finite, a stop string check raises) fails that job alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.sampling import NonFiniteLogitsError, SamplingParams, non_finite_rows
from runtime.runners.cache import SlotKVCache
from server.next_tokens import public_error
from server.schemas import FinishReason
from server.sequence import Detokenizer, GenerationJob, Running, Sequence

log = logging.getLogger(__name__)

FORCED_OUT = -1.0e9  # transformers' score for "cannot be chosen": far below any real sum of log-probabilities


@dataclass
class Lineage:
    """The tokens of a beam or hypothesis, with what a `Sequence` records per token."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # each token's own log-probability under its beam
    token_times: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    reason: FinishReason | None = None  # set when this continuation ends
    text: str | None = None  # the text cut at a stop string (None: decode the tokens)


class BeamSearch:
    """One job's beam search: its beams (sequences of the batch) and the hypotheses finished so far.

    The state is transformers' for a batch of one: `scores` its running_beam_scores (num_beams,),
    `kept_scores`/`kept_done` its beam_scores/is_sent_finished, `kept` its finished sequences.
    """

    def __init__(self, beams: list[Sequence], params: SamplingParams, ends: frozenset[int]) -> None:
        n = len(beams)
        self.beams, self.ends = beams, ends
        self.length_penalty, self.early_stopping = params.length_penalty, params.early_stopping
        self.width = max(2, 1 + len(ends)) * n  # continuations looked at per step
        self.scores = torch.zeros(1, n)  # (1, n) sum of log-probabilities of each beam
        self.scores[:, 1:] = FORCED_OUT  # every beam starts as the prompt: only the first one competes
        self.kept_scores = torch.full((1, n), FORCED_OUT)  # (1, n) length-penalised, best first
        self.kept_done = torch.zeros(1, n, dtype=torch.bool)  # (1, n) which kept entries are real hypotheses
        self.kept: list[Lineage] = [Lineage() for _ in range(n)]
        self.improvable = torch.ones(1, 1, dtype=torch.bool)  # a beam may still beat the worst kept hypothesis
        self.best: Sequence | None = None  # the answer, once the search is over

    @property
    def done(self) -> bool:
        return self.best is not None

    def advance(self, logits: Tensor, slots: list[int], cache: SlotKVCache, tokenizer: Detokenizer,
                now: float) -> None:
        """One step from the beams' (n, V) logits (beam i lives in `slots[i]`): keep or finish continuations,
        move the keys/values of beams that continue another beam, and end the search when nothing can improve."""
        bad = non_finite_rows(logits)
        if bad:
            raise NonFiniteLogitsError(bad)
        n, vocab = logits.shape
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (n, V)
        totals = (logprobs + self.scores[0, :, None]).reshape(1, -1)  # (1, n * V)
        values, indices = torch.topk(totals, k=self.width)  # (1, width), best first
        parents, tokens = (indices[0] // vocab).tolist(), (indices[0] % vocab).tolist()
        chosen = logprobs[indices[0] // vocab, indices[0] % vocab].tolist()  # each token's own log-probability
        tops = self._tops(logprobs)
        candidates = [self._extend(self.beams[p], t, lp, tops[p] if tops else None, now, tokenizer)
                      for p, t, lp in zip(parents, tokens, chosen, strict=True)]
        hits = torch.tensor([[c.reason is not None for c in candidates]])  # (1, width)
        generated = len(candidates[0].token_ids)  # every continuation has as many tokens

        # The beams of the next step: the best n continuations that do not end.
        running = values + hits.to(torch.float32) * FORCED_OUT
        order = torch.topk(running, k=n)[1]  # (1, n)
        next_scores = running.gather(1, order)

        # Finished hypotheses: the ending continuations among the best n, merged with those kept so far.
        top_n = torch.arange(self.width)[None, :] < n
        finished = hits & top_n
        penalised = values / (generated ** self.length_penalty)
        full = self.kept_done.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        penalised += full.to(torch.float32) * FORCED_OUT
        penalised += (~self.improvable).to(torch.float32) * FORCED_OUT
        penalised += (~finished) * FORCED_OUT
        merged_scores = torch.cat((self.kept_scores, penalised), dim=1)
        merged_done = torch.cat((self.kept_done, finished), dim=1)
        merged = [*self.kept, *candidates]
        keep = torch.topk(merged_scores, k=n)[1]  # (1, n)
        self.kept_scores, self.kept_done = merged_scores.gather(1, keep), merged_done.gather(1, keep)
        self.kept = [merged[i] for i in keep[0].tolist()]

        # Can anything still improve? (transformers' early-stopping heuristic, then its loop condition)
        never = self.early_stopping == "never" and self.length_penalty > 0  # judged at the longest length possible
        horizon = self.beams[0].max_new_tokens if never else generated
        best_possible = next_scores[:, :1] / (horizon ** self.length_penalty)
        worst_kept = torch.where(self.kept_done, self.kept_scores.min(dim=1, keepdim=True)[0], FORCED_OUT)
        self.improvable = self.improvable & torch.any(best_possible > worst_kept, dim=-1, keepdim=True)
        open_beam = not (bool(self.kept_done.all()) and self.early_stopping is True)
        if not (bool(self.improvable.all()) and open_beam and not bool(hits.all())):
            self._finish(tokenizer)
            return
        picked = order[0].tolist()
        if generated > 1:  # after the first step; before it every slot holds just the prompt, as the prefill left it
            self._move(slots, [parents[c] for c in picked], cache)
        self.scores = next_scores
        for beam, c in zip(self.beams, picked, strict=True):
            lineage = candidates[c]
            beam.token_ids, beam.logprobs, beam.token_times, beam.top = (
                lineage.token_ids, lineage.logprobs, lineage.token_times, lineage.top)

    def _tops(self, logprobs: Tensor) -> list[list[tuple[int, float]]] | None:
        """Each beam's most likely next tokens (the job's `top_logprobs`), from the distribution its token is drawn."""
        k = self.beams[0].top_logprobs
        if not k:
            return None
        top = logprobs.topk(k, dim=-1)
        return [list(zip(ids, lps, strict=True)) for ids, lps in zip(top.indices.tolist(), top.values.tolist(),
                                                                      strict=True)]

    def _extend(self, beam: Sequence, token: int, logprob: float, top: list[tuple[int, float]] | None, now: float,
                tokenizer: Detokenizer) -> Lineage:
        """Beam + token, and whether it ends there; the same rules as `Sequence.append`, in the same order."""
        ids = [*beam.token_ids, token]
        lineage = Lineage(ids, [*beam.logprobs, logprob], [*beam.token_times, now],
                          [*beam.top, top] if top is not None else [])
        if token in self.ends:
            lineage.reason = FinishReason.eos
        elif beam.stop:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in beam.stop) if i >= 0]
            if hits:
                lineage.reason, lineage.text = FinishReason.stop, text[:min(hits)]
        if lineage.reason is None and len(ids) >= beam.max_new_tokens:
            lineage.reason = FinishReason.length
        return lineage

    def _move(self, slots: list[int], parents: list[int], cache: SlotKVCache) -> None:
        """Beam i continues beam parents[i]: its slot takes that beam's keys/values (all beams have as many)."""
        moves = [(slots[p], slots[i]) for i, p in enumerate(parents) if p != i]
        cache.fork([src for src, _ in moves], [dst for _, dst in moves], self.beams[0].cached)

    def _finish(self, tokenizer: Detokenizer) -> None:
        """The answer is the best kept hypothesis; the beams end (and leave the batch at the end of the step)."""
        best = self.kept[0]
        reason = best.reason or FinishReason.length  # kept entries without a reason hold no hypothesis
        text = best.text if best.text is not None else tokenizer.decode(best.token_ids, skip_special_tokens=True)
        self.best = replace(self.beams[0], token_ids=best.token_ids, logprobs=best.logprobs,
                            token_times=best.token_times, top=best.top, text=text, finish_reason=reason, cached=0)
        for beam in self.beams:
            beam.finish_reason = reason


def job_width(job: GenerationJob) -> int:
    """Sequences a job puts in the batch, all counted against its limits: its beams (or its one answer)
    and its comparison decodes."""
    return (job.params.num_beams if job.params.is_beam else 1) + len(job.compare)


def open_beams(running: Running, eos_id: int | None) -> Running:
    """A beam-search job's answer becomes `num_beams` beams, which share its prompt's prefill as comparisons do."""
    job = running.pending.job
    if not isinstance(job, GenerationJob) or not job.params.is_beam:  # a classification (no sequence) never beams
        return running
    answer, *comparisons = running.sequences
    beams = [replace(answer, token_ids=[], logprobs=[], token_times=[], top=[]) for _ in range(job.params.num_beams)]
    ends = frozenset(() if job.ignore_eos else (*([] if eos_id is None else [eos_id]), *job.end_ids))
    running.sequences = [*beams, *comparisons]
    running.remaining = len(running.sequences)
    running.beams = BeamSearch(beams, job.params, ends)
    return running


def advance_beams(beam_logits: dict[int, Tensor], batch: list[Sequence], owner: Callable[[Sequence], Running],
                  cache: SlotKVCache, tokenizer: Detokenizer, fail: Callable[[Running, BaseException], None],
                  now: float) -> None:
    """One beam-search step for every job whose beams drew nothing this step (rows of `batch` are cache slots);
    a job whose step fails is failed alone."""
    jobs: dict[int, Running] = {}
    for row in beam_logits:
        running = owner(batch[row])
        jobs.setdefault(id(running), running)
    row_of = {id(seq): row for row, seq in enumerate(batch)}
    for running in jobs.values():
        search = running.beams
        if running.error is not None or search is None or search.done:
            continue
        rows = [row_of[id(beam)] for beam in search.beams]
        try:
            search.advance(torch.stack([beam_logits[row] for row in rows]), rows, cache, tokenizer, now)
        except Exception as e:
            fail(running, public_error(search.beams[0], e))


def answer_of(running: Running) -> tuple[Sequence, list[Sequence]]:
    """A finished job's answer and its comparisons: the best hypothesis for beam search, else its first sequence."""
    if running.beams is None or running.beams.best is None:
        main, *comparisons = running.sequences
        return main, comparisons
    return running.beams.best, running.sequences[len(running.beams.beams):]
