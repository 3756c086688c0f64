"""What the engine works on: a request (`GenerationJob`), its decode streams (`Sequence`) and the result,
and how a job travels through the engine (`Pending` while queued, `Running` once admitted).

A job becomes one `Sequence` for the answer (or one per beam: server/beams.py) plus one per comparison
decode. Each sequence carries everything that makes it independent of its neighbours in a batch — its
head, sampling settings, own random generator, stop conditions and its slot in the KV cache — so
sequences of different requests and heads can share every forward pass and still give the output
they would give alone.
A sequence records only finite log-probabilities, so whatever it holds can always be sent as JSON.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from heads.factored import ServingHead
from heads.sampling import NonFiniteLogitsError, SamplingParams
from server.classify import ClassifyJob, ClassifyResult
from server.schemas import FinishReason

if TYPE_CHECKING:
    from server.beams import BeamSearch

log = logging.getLogger(__name__)


class Detokenizer(Protocol):
    """All that decoding asks of the base's tokenizer: ids back to text (any Hugging Face tokenizer)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclass
class Sequence:
    """One decode stream over a shared prompt, with its own head, settings and stop conditions."""

    decoder: str  # metrics label: the strategy, or "linear_greedy" / "linear_top_k" for comparisons
    head_label: str  # the head's name, or "base" for the base's own linear head
    # None: the base's LM head. A strong reference, so eviction or deletion cannot pull it mid-decode.
    head: ServingHead | None
    params: SamplingParams
    generator: torch.Generator | None  # per sequence, so its draws do not depend on what else is decoding
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    end_ids: tuple[int, ...] = ()  # more tokens that end it as EOS does: a chat template's end of turn
    top_logprobs: int = 0  # most likely alternatives to record per token (OpenAI's `logprobs`)
    cached: int = 0  # tokens of this sequence whose keys/values sit in its cache slot
    token_ids: list[int] = field(default_factory=list)  # generated ids, including a final EOS
    logprobs: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each token was produced
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token: (id, logprob), most likely first
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

    def append(self, token_id: int, logprob: float, now: float, tokenizer: Detokenizer, eos_id: int | None) -> None:
        """Record one token and decide whether the sequence ends here (EOS, a stop string, or length).

        Raises NonFiniteLogitsError, recording nothing, for a NaN or infinite log-probability: JSON has no
        such numbers, and a stream that could not send its token would end without a word.
        """
        if not math.isfinite(logprob):
            raise NonFiniteLogitsError([0])
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.token_times.append(now)
        if (token_id == eos_id or token_id in self.end_ids) and not self.ignore_eos:
            self.finish_reason = FinishReason.eos
        elif self.stop:
            # Decoding the whole continuation each step is cheap at these lengths and, unlike decoding
            # token by token, sees stop strings that straddle tokens or multi-byte characters.
            self.text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = FinishReason.stop
                return
        if self.finish_reason is None and len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = FinishReason.length
        if self.finish_reason is not None:
            self.text = tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def add_top(self, ids: list[int], logprobs: list[float]) -> None:
        """Record the last token's most likely alternatives; finite only, as `append`."""
        if not all(math.isfinite(v) for v in logprobs):
            raise NonFiniteLogitsError([0])
        self.top.append(list(zip(ids, logprobs, strict=True)))


@dataclass
class GenerationJob:
    """A validated request: token ids of the formatted prompt and how to continue it."""

    prompt_ids: list[int]
    head: ServingHead | None  # prepared by the handler (None: the base's linear head)
    head_label: str  # the head's registry name, or "base"
    params: SamplingParams
    seed: int  # seeds the answer and the linear_top_k comparison alike
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    compare: tuple[str, ...] = ()  # from "greedy", "top_k"
    ignore_eos: bool = False
    end_ids: tuple[int, ...] = ()  # tokens that end every sequence of the job besides EOS (chat end of turn)
    top_logprobs: int = 0  # alternatives per token to report for the answer (0: none)
    accepted_at: float = field(default_factory=time.perf_counter)


@dataclass
class JobResult:
    main: Sequence
    comparisons: list[Sequence]
    accepted_at: float
    started_at: float
    finished_at: float
    prompt_tokens: int = 0


Settle = Callable[[JobResult | ClassifyResult | None, BaseException | None], None]


@dataclass
class Pending:
    """A job with the way back to whoever waits for it."""

    job: GenerationJob | ClassifyJob  # a classification (server/classify.py) is a prefill with no decode
    settle: Settle  # called once, from the worker thread, with the result or the error
    abandoned: Callable[[], bool] = lambda: False  # the caller stopped waiting: skip or drop the job
    # Streaming callers: called from the worker after every step that gave the job new tokens, with its sequences.
    progress: Callable[[list[Sequence]], None] | None = None

    def answer(self, result: JobResult | ClassifyResult | None, error: BaseException | None) -> None:
        """Settle; a caller's callback that fails must not cost anyone else their answer."""
        try:
            self.settle(result, error)
        except Exception:
            log.exception("a caller's settle callback failed")

    def gone(self) -> bool:
        """Whether the caller stopped waiting; a check that fails keeps the job (and the batch) going."""
        try:
            return self.abandoned()
        except Exception:
            log.exception("a caller's abandoned() check failed")
            return False


@dataclass
class Running:
    """An admitted job: its sequences are (or were) in the batch."""

    pending: Pending
    sequences: list[Sequence]
    started_at: float
    remaining: int = field(init=False)
    # Set when one of its sequences fails: the job draws no more tokens, and leaves at the end of the step.
    error: BaseException | None = None
    beams: BeamSearch | None = None  # a beam-search job: its first num_beams sequences are the beams

    def __post_init__(self) -> None:
        self.remaining = len(self.sequences)
