"""Heads are validated by what they compute: a few of the base's own hidden states go through a head
before it serves, and a head whose logits are non-finite or absurd is refused.

A head's files can be well formed, finite and the right shape and still be unusable: weights of 1e18
give logits that overflow once sampled, and one such row used to fail a whole batch. The probe runs
the head exactly as the engine does (`group_logits`, in the form the cache serves it) on the base's
final hidden states for a few short prompts, computed once per base.
"""

from __future__ import annotations

import torch
from torch import Tensor

from heads import HeadFormatError
from heads.base import Base
from server.head_logits import Head, group_logits

PROBE_PROMPTS = (
    "Problem: What is 12 + 7?\nSolution:",
    "The capital of France is",
    "Once upon a time, there was a little",
    "def add(a, b):\n    return",
)
# Base LMs and trained heads keep logits within a few hundred (GPT-2's span about +-200), and no
# distribution over V tokens needs a gap past ln(V) + 100 to reach float32's smallest probabilities.
# 1e4 is 50 times what anything trained produces, while sampling stays far from float32's overflow
# (3.4e38) and a half-precision base's float16 range (65504).
MAX_ABS_LOGIT = 1e4


class HeadOutputError(HeadFormatError):
    """The head's files are fine but its logits on the base's probe states are non-finite or absurd."""


def probe_states(base: Base) -> Tensor:
    """(N, D) final hidden states of the probe prompts, in the base's dtype on its device."""
    rows = []
    with torch.no_grad():
        for prompt in PROBE_PROMPTS:
            ids = list(base.tokenizer(prompt)["input_ids"])[: base.n_positions]
            if ids:
                out = base.hidden_states(torch.tensor([ids], device=base.device))
                rows.append(out.last_hidden_state[0])  # (T, D)
    return torch.cat(rows)


class HeadProbe:
    def __init__(self, base: Base) -> None:
        self.base = base
        self.hidden = probe_states(base)  # (N, D)

    def check(self, head: Head) -> None:
        """Raise HeadOutputError naming the problem if the head's logits on the probe states are unusable."""
        n = self.hidden.shape[0]
        with torch.no_grad():
            [(_, logits)] = group_logits(self.base, self.hidden, [head] * n, [list(range(n))])
        if isinstance(logits, Exception):
            raise HeadOutputError(f"the head failed on the base's probe states ({type(logits).__name__})")
        if not bool(torch.isfinite(logits).all()):
            raise HeadOutputError("the head's logits on the base's probe states are not finite (NaN or Inf)")
        peak = float(logits.abs().max())
        if peak > MAX_ABS_LOGIT:
            raise HeadOutputError(f"the head's logits on the base's probe states reach |logit| {peak:.3g}, beyond "
                                  f"the bound of {MAX_ABS_LOGIT:g}")
