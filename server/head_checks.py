"""Heads are validated by what they compute: a few of the base's own hidden states go through a head
before it serves, and a head whose logits are non-finite or absurd is refused.

A head's files can be well formed, finite and the right shape and still be unusable: weights of 1e18
give logits that overflow once sampled, and one such row used to fail a whole batch. The probe runs
the head through the same calls as the engine (in the form the cache serves it) on the base's final
hidden states for a few short prompts, computed once per base with the base's own logits on them. A head that
does not generate (a classifier) is probed the same way on its label logits, and never asked to decode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from heads import HeadFormatError
from heads.base import Base
from heads.classifier import ClassifierHead
from heads.factored import FactoredHead
from runtime.head_logits import Head

# Two states, one of the template heads are trained with and one of plain prose: weights that overflow do
# so on any state, and each state costs a factored head one V x D row product on every cold load (about
# 3 ms for GPT-2's shapes on 2 cores). Whatever a probe misses, the engine still confines to its request.
PROBE_PROMPTS = (
    "Problem: What is 12 + 7?\nSolution:",
    "Once upon a time, there was a little",
)
# Base LMs and trained heads keep logits within a few hundred (GPT-2's span about +-200), and no
# distribution over V tokens needs a gap past ln(V) + 100 to reach float32's smallest probabilities.
# 1e4 is 50 times what anything trained produces, while sampling stays far from float32's overflow
# (3.4e38) and a half-precision base's float16 range (65504).
MAX_ABS_LOGIT = 1e4


class HeadOutputError(HeadFormatError):
    """The head's files are fine but its logits on the base's probe states are non-finite or absurd."""


def probe_states(base: Base) -> Tensor:
    """(N, D) final hidden states of the probe prompts at their last position (the state a decode step
    sees), in the base's dtype on its device. One row per prompt keeps a check at a few V x D row
    products (~5 ms for GPT-2 shapes on 2 cores), not one per prompt token: it is paid on every cold load."""
    rows = []
    with torch.no_grad():
        for prompt in PROBE_PROMPTS:
            ids = list(base.tokenizer(prompt)["input_ids"])[: base.n_positions]
            if ids:
                out = base.hidden_states(torch.tensor([ids], device=base.device))
                rows.append(out.last_hidden_state[0, -1:])  # (1, D)
    return torch.cat(rows)  # (N, D)


class HeadProbe:
    """The probe states and the base's own logits on them, both computed once per base: a check then costs
    only what the head itself adds (for a factored head, one V x D row product per probe state)."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.hidden = probe_states(base)  # (N, D)
        with torch.no_grad():
            self.base_logits = base.linear_logits(self.hidden).float()  # (N, V)

    def logits(self, head: Head) -> Tensor:
        """(N, V) float32 logits of the head on the probe states, through the calls the engine makes
        (runtime/head_logits.py): a factored head's projection goes through the base's LM head and is
        combined; any other head decodes, given the base's logits when it says it uses them. A classifier gives
        (N, C) label logits, classifying each probe state as the engine classifies a pooled prompt."""
        with torch.no_grad():
            if head is None:
                return self.base_logits
            if isinstance(head, ClassifierHead):
                return head.classify(self.hidden).float()  # (N, C)
            z = self.base_logits if head.accepts_base_logits else None
            if isinstance(head, FactoredHead):
                projected = self.base.linear_logits(head.project(self.hidden).to(self.hidden.dtype))
                return head.combine(projected, z).float()
            return head.decode(self.hidden, base_logits=z).float()

    def check(self, head: Head) -> None:
        """Raise HeadOutputError naming the problem if the head's logits on the probe states are unusable."""
        try:
            logits = self.logits(head)
        except Exception as e:  # a head that raises on ordinary states cannot serve
            raise HeadOutputError(f"the head failed on the base's probe states ({type(e).__name__})") from None
        width = len(head.labels) if isinstance(head, ClassifierHead) else self.base.vocab_size
        if tuple(logits.shape) != (self.hidden.shape[0], width):
            raise HeadOutputError(f"the head's logits on the base's probe states have shape {tuple(logits.shape)}, "
                                  f"expected {(self.hidden.shape[0], width)}")
        if not bool(torch.isfinite(logits).all()):
            raise HeadOutputError("the head's logits on the base's probe states are not finite (NaN or Inf)")
        peak = float(logits.abs().max())
        if peak > MAX_ABS_LOGIT:
            raise HeadOutputError(f"the head's logits on the base's probe states reach |logit| {peak:.3g}, beyond "
                                  f"the bound of {MAX_ABS_LOGIT:g}")
