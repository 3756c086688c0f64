"""Classification in the engine: a text is one prefill with no decode, finished in the step that admitted it.

Why through the engine rather than a forward of its own: classifications then share every base forward with
the generations in flight (a prompt joins a step like any newcomer's; its tokens cost what they cost in the
flat matrix, and nothing else), obey the same first-come admission and queue bound, and are isolated the same
way. A classification takes no cache slot, since nothing decodes after it: its `Prefill` has no slots, and asks
the runner for the mean of its final hidden states when its classifier pools by mean (`Prefill.mean`).

A head scores a text in one of two ways (`Scorer`):
- `Classifier`: a classifier head (heads/classifier.py) reads the prompt's pooled final hidden state, the last
  position's (the row every prefill gives) or the mean over all positions, and gives one logit per label.
- `Verbalizer`: a generative head, or the base's own LM head, is scored on one token per label (the first token
  of each label word): its next-token logits at the last prompt position restricted to those ids. All
  verbalizer rows of a step share one LM-head product (runtime/head_logits.py), as a decode step's rows do.
Probabilities are the softmax (float32) over the labels.

Isolation follows the engine's rules (server/engine.py): a forward that fails with a classification among the
newcomers is retried without it; a head that raises fails the texts scored by that head alone, probabilities
that are not finite fail their own text alone, and nothing here can fail a generation in the same step. Every
classification taken from the queue is settled exactly once: here, or by the engine's `_fail_active`
(`Classifications.take`) when the whole step fails.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from heads.base import Base
from heads.classifier import ClassifierHead
from heads.factored import ServingHead
from runtime.head_logits import group_logits
from runtime.runners import Prefill
from server.errors import GenerationFailedError, HeadOutputError
from server.job_metrics import count_failure
from server.metrics import Metrics

if TYPE_CHECKING:
    from server.sequence import GenerationJob, Running

log = logging.getLogger(__name__)

Pooling = Literal["last", "mean"]


@dataclass(frozen=True, eq=False)
class Verbalizer:
    """Score with a generative head's (None: the base's) next-token logits on one token per label."""

    head: ServingHead | None
    token_ids: tuple[int, ...]  # per label, the first token of its label word; distinct
    labels: tuple[str, ...]
    pooling: Pooling = "last"  # the next token follows the last prompt position


@dataclass(frozen=True, eq=False)
class Classifier:
    """Score with a classifier head's `classify` on the prompt's pooled final hidden state."""

    head: ClassifierHead  # `classify((B, D)) -> (B, len(labels))`
    labels: tuple[str, ...]
    pooling: Pooling


Scorer = Verbalizer | Classifier


@dataclass
class ClassifyJob:
    """One text, formatted and tokenised as its head was trained, and how to score it."""

    prompt_ids: list[int]
    head_label: str  # the head's registry name, or "base": metric labels, error messages
    scorer: Scorer  # shared by the texts of one request
    accepted_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class ClassifyResult:
    probabilities: list[float]  # in the scorer's label order; they sum to 1
    accepted_at: float
    started_at: float  # the step that classified it began (taken from the queue)
    finished_at: float


def prefill_for(job: GenerationJob | ClassifyJob, slots: list[int]) -> Prefill:
    """The engine's prefill for a job: a classification asks for its mean when its head pools by mean."""
    return Prefill(job.prompt_ids, slots, mean=isinstance(job, ClassifyJob) and job.scorer.pooling == "mean")


class Classifications:
    """The classification jobs of the step under way, their rows of the step's output, and their settling
    (the engine's worker thread only)."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self._jobs: list[tuple[Running, Prefill]] = []  # admitted this step, not yet settled
        self._rows: dict[int, tuple[Tensor, Tensor | None]] = {}  # id(prefill) -> last (D,), mean (D,) or None

    def begin(self, admitted: list[Running], prefills: list[Prefill]) -> None:
        """Note the step's newcomers that are classifications (they hold no sequence), with their prefills."""
        self._jobs = [(r, p) for r, p in zip(admitted, prefills, strict=True) if isinstance(r.pending.job,
                                                                                             ClassifyJob)]
        self._rows = {}

    def collect(self, hidden: Tensor, n_decode: int, prefills: list[Prefill]) -> None:
        """Keep the rows of this step's classifications from one runner output (n_decode + len(prefills) + means,
        D); called for every forward of the step (a retry runs some prefills again, alone)."""
        if not self._jobs:
            return
        mine = {id(p) for _, p in self._jobs}
        mean_row = n_decode + len(prefills)
        for i, prefill in enumerate(prefills):
            mean = None
            if prefill.mean:
                mean, mean_row = hidden[mean_row], mean_row + 1
            if id(prefill) in mine:
                self._rows[id(prefill)] = (hidden[n_decode + i], mean)

    def take(self) -> list[Running]:
        """The step's classifications not settled yet, handed over to whoever settles them instead."""
        jobs, self._jobs = self._jobs, []
        return [running for running, _ in jobs]

    def settle(self, metrics: Metrics) -> None:
        """Score every classification of the step that is still alive and answer each exactly once."""
        if not self._jobs:
            return
        try:
            outcomes = self._score()
        except Exception as e:  # a bug here: fail the classifications, never the generations beside them
            log.exception("scoring the step's classifications failed")
            outcomes = {id(r): GenerationFailedError(f"classifying failed ({type(e).__name__}); other requests "
                                                     f"were not affected") for r, _ in self._jobs}
        now = time.perf_counter()
        while self._jobs:
            running, _ = self._jobs.pop()
            outcome = running.error or outcomes.get(id(running), GenerationFailedError("the text was not scored"))
            if isinstance(outcome, BaseException):
                count_failure(metrics, running.pending.job.head_label, outcome)
                running.pending.answer(None, outcome)
                continue
            job = running.pending.job
            result = ClassifyResult(probabilities=outcome, accepted_at=job.accepted_at,
                                    started_at=running.started_at, finished_at=now)
            try:
                label = job.head_label
                metrics.classifications.labels(head=label).inc()
                metrics.queue_wait.labels(head=label).observe(result.started_at - result.accepted_at)
                metrics.classify_latency.labels(head=label).observe(result.finished_at - result.accepted_at)
            except Exception:  # metrics are not worth a request
                log.exception("recording a classification's metrics failed")
            running.pending.answer(result, None)
        self._rows = {}  # the step's rows are not kept past it

    def _score(self) -> dict[int, list[float] | BaseException]:
        """Probabilities (or the error) per id(running) of every live classification of the step."""
        live: list[tuple[Running, ClassifyJob, Tensor, Tensor | None]] = []
        for running, prefill in self._jobs:
            job = running.pending.job
            if running.error is None and isinstance(job, ClassifyJob) and id(prefill) in self._rows:
                live.append((running, job, *self._rows[id(prefill)]))
        outcomes: dict[int, list[float] | BaseException] = {}
        verbal = [(r, j, last) for r, j, last, _ in live if isinstance(j.scorer, Verbalizer)]
        if verbal:
            outcomes.update(self._verbalize(verbal))
        by_head: dict[int, tuple[Classifier, list[tuple[Running, ClassifyJob, Tensor]]]] = {}
        for r, j, last, mean in live:
            if isinstance(j.scorer, Classifier) and j.scorer.pooling == "mean" and mean is None:  # never: prefill_for
                outcomes[id(r)] = GenerationFailedError("the text's mean hidden state is missing")
            elif isinstance(j.scorer, Classifier):
                pooled = mean if mean is not None and j.scorer.pooling == "mean" else last
                by_head.setdefault(id(j.scorer.head), (j.scorer, []))[1].append((r, j, pooled))
        for scorer, group in by_head.values():
            outcomes.update(self._classify(scorer, group))
        return outcomes

    def _verbalize(self, rows: list[tuple[Running, ClassifyJob, Tensor]]) -> dict[int, list[float] | BaseException]:
        """Each head's next-token logits once per head (one shared LM-head product), then each text's label ids."""
        heads = [j.scorer.head if isinstance(j.scorer, Verbalizer) else None for _, j, _ in rows]
        groups: dict[int, list[int]] = {}
        for i, head in enumerate(heads):
            groups.setdefault(id(head), []).append(i)
        hidden = torch.stack([last for _, _, last in rows])  # (n, D)
        out: dict[int, list[float] | BaseException] = {}
        try:
            scored = group_logits(self.base, hidden, heads, list(groups.values()))
        except Exception as e:  # the base's own LM head failed: every verbalizer text of the step, nobody else
            log.exception("the base's LM head failed on the step's classifications")
            error = GenerationFailedError(f"classifying failed ({type(e).__name__}); other requests were not affected")
            return {id(r): error for r, _, _ in rows}
        for members, logits in scored:
            for k, i in enumerate(members):
                running, job, _ = rows[i]
                scorer = job.scorer
                assert isinstance(scorer, Verbalizer)
                if isinstance(logits, Exception):
                    log.error("head %r raised while classifying: %r", job.head_label, logits)
                    out[id(running)] = HeadOutputError(f"head {job.head_label!r} cannot classify: its decode raised "
                                                       f"{type(logits).__name__}")
                    continue
                ids = torch.tensor(scorer.token_ids, device=logits.device)
                out[id(running)] = _probabilities(logits[k, ids][None], [job])[0]
        return out

    def _classify(self, scorer: Classifier,
                  rows: list[tuple[Running, ClassifyJob, Tensor]]) -> dict[int, list[float] | BaseException]:
        """One classifier head's logits for its texts of the step (their pooled states), in one call."""
        n_labels = len(scorer.labels)
        try:
            with torch.inference_mode():
                logits = scorer.head.classify(torch.stack([pooled for _, _, pooled in rows]))  # (n, C)
            if tuple(logits.shape) != (len(rows), n_labels):
                raise ValueError(f"logits of shape {tuple(logits.shape)}, expected {(len(rows), n_labels)}")
        except Exception as e:  # the head's fault: its own texts fail, nobody else's
            label = rows[0][1].head_label
            log.error("head %r raised while classifying: %r", label, e)
            error = HeadOutputError(f"head {label!r} cannot classify: it raised {type(e).__name__}")
            return {id(r): error for r, _, _ in rows}
        probabilities = _probabilities(logits, [j for _, j, _ in rows])
        return {id(r): p for (r, _, _), p in zip(rows, probabilities, strict=True)}


def _probabilities(logits: Tensor, jobs: list[ClassifyJob]) -> list[list[float] | BaseException]:
    """Softmax over the labels (float32), row by row; a row that is not finite fails its own text."""
    probs = torch.softmax(logits.float(), dim=-1)  # (n, C)
    finite = torch.isfinite(probs).all(dim=-1).tolist()
    out: list[list[float] | BaseException] = []
    for row, ok, job in zip(probs.tolist(), finite, jobs, strict=True):
        if ok:
            out.append(row)
        elif isinstance(job.scorer, Verbalizer) and job.scorer.head is None:  # the base's own logits: not a head's
            out.append(GenerationFailedError("the base model produced non-finite logits for this text"))
        else:
            out.append(HeadOutputError(f"head {job.head_label!r} cannot classify: it produced non-finite logits "
                                       f"(NaN or infinity)"))
    return out
