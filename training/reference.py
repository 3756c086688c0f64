"""How well a row's output distribution predicts the reference solutions, from the base's cached hidden states.

Why apart from decoding: teacher-forced scores need the base's hidden state at every target position, never a
decode loop, and the base is frozen, so `training.hidden_cache.target_states` runs it once per prompt style and
every row (the base's own LM head and each head) is scored from those states: only the V x D output product runs
per row. `reference_ce` is the main table's CE; `reference_curves` gives, in one more pass over the same states,
the CE at each sampling temperature and the share of reference tokens inside each top-k (the decoding sweep).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from heads import HeadModule
from training.hidden_cache import DEFAULT_CHUNK_ROWS, TargetStates, chunked_cross_entropy


@dataclass(frozen=True)
class Curves:
    """Teacher-forced scores of one row over all target tokens, per decoding setting."""

    nll: dict[float, float]  # temperature -> summed NLL (nats) of the reference tokens at that temperature
    covered: dict[int, int]  # k -> reference tokens among the row's k highest logits
    n: int  # target tokens

    def cross_entropy(self, temperature: float) -> float:
        return self.nll[temperature] / max(1, self.n)

    def coverage(self, k: int) -> float:
        return self.covered[k] / max(1, self.n)


def state_chunks(states: TargetStates, device: torch.device | str, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 ) -> Iterator[tuple[Tensor, Tensor]]:
    """(hidden (c, D) float32, targets (c,) int64) over every target row, `chunk_rows` at a time.

    Straight slices of the (possibly memory-mapped) float16 states: memory stays one chunk whatever the data.
    """
    for start in range(0, states.n_targets, chunk_rows):
        hidden = torch.from_numpy(states.hidden[start: start + chunk_rows].astype(np.float32))  # a copy: writable
        targets = torch.from_numpy(states.targets[start: start + chunk_rows].astype(np.int64))
        yield hidden.to(device), targets.to(device)


@torch.no_grad()
def reference_ce(head: HeadModule | None, states: TargetStates, embeddings: Tensor,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[float, int]:
    """(summed NLL in nats, target tokens) of the references under the row's logits (None: the base's LM head)."""
    if head is not None:
        head.eval()
    total, n = 0.0, 0
    for hidden, targets in state_chunks(states, embeddings.device, chunk_rows):
        nll, rows = chunked_cross_entropy(head, hidden, targets, embeddings, chunk_rows=chunk_rows)
        total, n = total + nll, n + rows
    return total, n


@torch.no_grad()
def reference_curves(head: HeadModule | None, states: TargetStates, embeddings: Tensor, *,
                     temperatures: Sequence[float], top_ks: Sequence[int],
                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Curves:
    """CE at every temperature (> 0) and top-k coverage, from one logits product per chunk.

    The logits and the loss are formed exactly as `chunked_cross_entropy` forms them (the same chunks, the
    same float32 cross-entropy, no division at T = 1), so the CE at T = 1 is the main table's to the bit.
    A reference token is inside the top k when fewer than k logits are strictly above its own (ties count in).
    """
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0 for a cross-entropy, got {list(temperatures)}")
    if head is not None:
        head.eval()
    nll = dict.fromkeys(temperatures, 0.0)
    covered = dict.fromkeys(top_ks, 0)
    n = 0
    for hidden, targets in state_chunks(states, embeddings.device, chunk_rows):
        logits = hidden @ embeddings.T.to(hidden.dtype) if head is None else head(hidden[None], embeddings)[0]  # (c, V)
        for t in temperatures:
            scaled = logits if t == 1.0 else logits / t
            nll[t] += float(F.cross_entropy(scaled.float(), targets, reduction="sum"))
        covered_by = top_k_hits(logits, targets, top_ks)
        for k in top_ks:
            covered[k] += covered_by[k]
        n += int(targets.shape[0])
    return Curves(nll=nll, covered=covered, n=n)


def top_k_hits(logits: Tensor, targets: Tensor, top_ks: Sequence[int]) -> dict[int, int]:
    """How many of the (c,) targets are among their row's k highest (c, V) logits, for each k."""
    target_logit = logits.gather(1, targets[:, None])  # (c, 1)
    above = (logits > target_logit).sum(dim=1)  # (c,): the target's rank, 0 = the argmax
    return {k: int((above < k).sum()) for k in top_ks}
