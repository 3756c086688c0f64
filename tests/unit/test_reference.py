"""Teacher-forced scores from cached states: equal to `chunked_cross_entropy`, top-k coverage on worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from heads import BackwardAttentionConfig, BackwardAttentionHead, HeadModule
from training.hidden_cache import TargetStates, chunked_cross_entropy
from training.reference import reference_ce, reference_curves, top_k_hits

V, D = 40, 8


def _states(n_rows: int = 37, seed: int = 0) -> TargetStates:
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n_rows, D)).astype(np.float16)
    targets = rng.integers(0, V, size=n_rows).astype(np.int32)
    offsets = np.array([0, 10, 25, n_rows], dtype=np.int64)  # three examples
    return TargetStates(hidden, targets, offsets, pass_seconds=0.0, pass_tokens=0, from_disk=False)


def _head() -> HeadModule:
    torch.manual_seed(0)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=6, num_heads=2), vocab_size=V, n_embd=D)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the init that equals the base distribution
    return head


@pytest.mark.parametrize("with_head", [False, True])
def test_curves_equal_chunked_cross_entropy_at_every_temperature(with_head: bool) -> None:
    states, embeddings = _states(), torch.randn(V, D, generator=torch.Generator().manual_seed(1))
    head = _head() if with_head else None
    hidden, targets = states.rows(range(len(states)))
    curves = reference_curves(head, states, embeddings, temperatures=(0.3, 1.0, 2.0), top_ks=(1, 5), chunk_rows=16)
    assert curves.n == 37
    with torch.no_grad():
        for t in (0.3, 1.0, 2.0):
            nll, n = chunked_cross_entropy(head, hidden, targets, embeddings, chunk_rows=16, temperature=t)
            assert (curves.nll[t], n) == (nll, 37)  # the same chunks, the same arithmetic
    # The main table's CE (one chunked_cross_entropy per chunk) is the curve's T = 1 to the bit.
    assert reference_ce(head, states, embeddings, chunk_rows=16) == (curves.nll[1.0], 37)
    assert curves.cross_entropy(1.0) == curves.nll[1.0] / 37
    # A sharper distribution than the model's own is a worse fit of the reference than T = 1 here.
    assert curves.cross_entropy(0.3) > curves.cross_entropy(1.0)


def test_coverage_counts_the_reference_tokens_among_the_top_k() -> None:
    states, embeddings = _states(), torch.randn(V, D, generator=torch.Generator().manual_seed(2))
    curves = reference_curves(None, states, embeddings, temperatures=(1.0,), top_ks=(1, 3, V), chunk_rows=16)
    hidden, targets = states.rows(range(len(states)))
    logits = hidden @ embeddings.T  # (N, V)
    assert curves.covered[1] == int((logits.argmax(dim=1) == targets).sum())
    top3 = logits.topk(3, dim=1).indices
    assert curves.covered[3] == int((top3 == targets[:, None]).any(dim=1).sum())
    assert curves.coverage(V) == 1.0


def test_top_k_hits_on_worked_logits() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 5.0], [9.0, 1.0, 1.0]])
    targets = torch.tensor([2, 0, 0])
    # Ranks (logits strictly above the target's): 1, 1 (the tie with column 1 does not count), 0.
    assert top_k_hits(logits, targets, (1, 2, 3)) == {1: 1, 2: 3, 3: 3}


def test_curves_refuse_a_zero_temperature() -> None:
    with pytest.raises(ValueError, match="> 0"):
        reference_curves(None, _states(), torch.zeros(V, D), temperatures=(0.0,), top_ks=())


def test_a_uniform_row_costs_log_v() -> None:
    curves = reference_curves(None, _states(), torch.zeros(V, D), temperatures=(0.5, 1.0), top_ks=(1,))
    assert curves.cross_entropy(1.0) == pytest.approx(math.log(V)) == pytest.approx(curves.cross_entropy(0.5))
    assert curves.coverage(1) == 1.0  # every logit ties with the target's: nothing is strictly above it
