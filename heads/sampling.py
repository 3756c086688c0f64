"""Logits -> next token: greedy, top-k and nucleus (top-p) sampling with temperature.

`SamplingParams` also names beam search ("beam", with `num_beams`, `length_penalty` and `early_stopping`)
so that one settings object travels with every request; beam search is not a per-row draw, though: the
server's engine runs it over a job's beams (server/beams.py), and `sample` refuses it.

Pure torch and free of any model, so the server's decode loop and the training/evaluation code
draw tokens the same way. Every function takes (B, V) logits and returns per-row results; a
caller that wants per-sequence reproducibility passes each sequence's own `torch.Generator`.

Numerically safe by construction: logits are processed in float32, a temperature below
`TEMPERATURE_FLOOR` decodes greedily (dividing by it would overflow float32 for ordinary logits),
and a row with a non-finite value raises `NonFiniteLogitsError` instead of reaching `multinomial`
(whose own error names no row and, in a batch, cannot tell whose row it was).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor


class FinishReason(str, Enum):
    """Why a decode ended: the one list, shared by the server's answers and training's generations."""

    length = "length"  # max_new_tokens or the base context ran out
    eos = "eos"  # the model produced its end-of-sequence token
    stop = "stop"  # a stop string appeared; it is trimmed from the text

STRATEGIES = ("greedy", "top_k", "top_p")  # per-row draws: what `sample` does
BEAM = "beam"  # beam search over a job's beams (server/beams.py); not a per-row draw
EARLY_STOPPING = (False, True, "never")  # transformers' `early_stopping` values, with the same meaning
# Below this temperature sampling is greedy: the distribution is one-hot to float32 precision anyway, and
# ordinary logits divided by, say, 1e-38 overflow to inf.
TEMPERATURE_FLOOR = 1e-5


class NonFiniteLogitsError(ValueError):
    """Some rows of the logits hold NaN or +-inf (or overflow once scaled by the temperature); `rows` says which."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"non-finite logits in row(s) {rows[:8]}")
        self.rows = rows


@dataclass(frozen=True)
class SamplingParams:
    strategy: str = "greedy"  # "greedy" | "top_k" | "top_p"
    top_k: int = 50  # candidates kept by "top_k"
    top_p: float = 0.9  # probability mass kept by "top_p"
    temperature: float = 1.0  # logits are divided by it before sampling; greedy ignores it; tiny is greedy
    num_beams: int = 1  # beams kept by "beam"
    length_penalty: float = 1.0  # "beam": a finished hypothesis scores sum(logprobs) / length ** length_penalty
    early_stopping: bool | str = False  # "beam": when the search may stop (transformers' meaning)

    @property
    def is_greedy(self) -> bool:
        """Greedy by strategy, or by a temperature below TEMPERATURE_FLOOR (the limit of sampling as T -> 0).
        Beam search is never greedy: it ignores the temperature, as transformers' does without sampling."""
        return self.strategy == "greedy" or (self.strategy != BEAM and self.temperature < TEMPERATURE_FLOOR)

    @property
    def is_beam(self) -> bool:
        return self.strategy == BEAM

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, before any tensor work."""
        if self.strategy not in (*STRATEGIES, BEAM):
            raise ValueError(f"strategy must be one of {(*STRATEGIES, BEAM)}, got {self.strategy!r}")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be one of {EARLY_STOPPING}, got {self.early_stopping!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")


def scaled_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """(B, V) -> (B, V) float32 logits of the distribution the strategy draws from, before truncation.

    Greedy is temperature-free (dividing by a positive number never moves the argmax), so its
    log-probabilities are those of the raw logits; so are those of a temperature below the floor.
    """
    logits = logits.float()
    return logits if params.is_greedy else logits / params.temperature


def non_finite_rows(logits: Tensor) -> list[int]:
    """Indices of the (B, V) rows holding a NaN or an infinity.

    A row's sum is finite only if all its values are, and one sum per row costs a small fraction of an
    elementwise isfinite (~20x less on CPU for GPT-2's vocabulary); the exact test runs only when a sum
    is not finite (a NaN, an inf, or finite values whose sum overflows).
    """
    if bool(torch.isfinite(logits.sum(dim=-1)).all()):
        return []
    return (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist()


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """(B, V) -> (B, V) with everything below the k-th largest value set to -inf (ties kept)."""
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """(B, V) -> (B, V) keeping the smallest set of tokens whose probability reaches p.

    The most likely token always survives, so p close to 0 degenerates to greedy, never to nothing.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V): mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(B, V) logits -> ((B,) next ids, (B,) their log-probabilities).

    The log-probability is the log-softmax over the whole vocabulary of the temperature-scaled
    logits (before top-k/top-p truncation), so it stays comparable across strategies and rows;
    it is always <= 0. Rows with a non-finite value raise NonFiniteLogitsError naming them.
    """
    if params.is_beam:
        raise ValueError("beam search is not a per-row draw; the engine runs it over a job's beams (server/beams.py)")
    scaled = scaled_logits(logits, params)  # (B, V)
    bad = non_finite_rows(scaled)  # before anything draws
    if bad:
        raise NonFiniteLogitsError(bad)
    if params.is_greedy:
        ids = scaled.argmax(dim=-1)  # (B,)
    else:
        if params.strategy == "top_k":
            kept = top_k_filter(scaled, params.top_k)
        else:
            kept = top_p_filter(scaled, params.top_p)
        ids = torch.multinomial(F.softmax(kept, dim=-1), 1, generator=generator).squeeze(-1)  # (B,)
    logprobs = F.log_softmax(scaled, dim=-1).gather(-1, ids[:, None]).squeeze(-1)  # (B,)
    return ids, logprobs


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own for one sequence: its draws do not depend on what else runs."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
