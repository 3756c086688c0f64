"""Random backward-attention heads for the unit tests of heads/ and heads/factored.py."""

from __future__ import annotations

import torch
from torch import nn

from heads import BackwardAttentionConfig, BackwardAttentionHead

V, D = 97, 24  # 97 is prime: no chunk size other than 1 and 97 divides it


def make_head(seed: int = 0, randomize: bool = True, **cfg: object) -> BackwardAttentionHead:
    """A head whose every parameter is random, so the attention part is not trivially zero."""
    torch.manual_seed(seed)
    head = BackwardAttentionHead(BackwardAttentionConfig(**cfg), vocab_size=V, n_embd=D)  # type: ignore[arg-type]
    if randomize:
        with torch.no_grad():
            nn.init.normal_(head.query.weight, std=head.query.in_features ** -0.5)
            head.norm.weight.add_(0.1 * torch.randn(D))
            if head.alpha is not None:
                head.alpha.fill_(0.7)
    return head
