"""training.fit scores only the positions that predict a target, and gets the loss of scoring them all."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heads import BackwardAttentionConfig, BackwardAttentionHead
from training.fit import head_loss


def test_head_loss_equals_the_loss_over_every_position() -> None:
    torch.manual_seed(0)
    V, D = 40, 12
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, residual=True), vocab_size=V, n_embd=D)
    torch.nn.init.normal_(head.query.weight)  # a residual head starts as the base: make the attention count
    hidden, embeddings = torch.randn(3, 9, D), torch.randn(V, D)
    labels = torch.randint(0, V, (3, 9))
    labels[:, :4] = -100  # prompts
    labels[1, 7:] = -100  # padding
    loss, n = head_loss(head, hidden, labels, embeddings)
    full = head(hidden[:, :-1], embeddings)
    expected = F.cross_entropy(full.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert n == int((labels[:, 1:] != -100).sum()) == 5 + 3 + 5
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert head.query.weight.grad is not None and head.query.weight.grad.abs().sum() > 0
