"""The factored form of a backward-attention head gives the prepared head's logits without its keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from heads import BackwardAttentionConfig, BackwardAttentionHead
from server.factored import FactoredHead, SharedNorms, factorable

V, D = 97, 24


def random_head(**cfg: object) -> BackwardAttentionHead:
    torch.manual_seed(0)
    head = BackwardAttentionHead(BackwardAttentionConfig(**cfg), vocab_size=V, n_embd=D).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        nn.init.normal_(head.query.weight, std=0.3)
        head.norm.weight.add_(0.1 * torch.randn(D))
        if head.alpha is not None:
            head.alpha.fill_(0.7)
    return head


@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("latent_dim", [None, 16])
@pytest.mark.parametrize("residual", [True, False])
def test_factored_logits_equal_the_prepared_head(residual: bool, latent_dim: int | None, num_heads: int) -> None:
    head = random_head(residual=residual, latent_dim=latent_dim, num_heads=num_heads)
    embeddings, hidden = torch.randn(V, D), torch.randn(6, D)
    factored = FactoredHead(head, SharedNorms(embeddings))
    head.prepare(embeddings)
    expected = head.decode(hidden)
    assert (factored.decode(hidden, embeddings) - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 1e-1
    assert factored.accepts_base_logits == residual


def test_factored_head_keeps_no_vocabulary_sized_tensor() -> None:
    head = random_head(residual=True, latent_dim=16, num_heads=2)
    embeddings = torch.randn(V, D)
    factored = FactoredHead(head, SharedNorms(embeddings))
    assert factored.resident_bytes() == 2 * D * head.query.in_features * 4  # fold and expansion, D x H*d each
    head.prepare(embeddings)
    assert head._key_cache is not None and head._key_cache.shape == (V, head.query.in_features)


def test_probs_weighting_is_not_factorable() -> None:
    head = random_head(weighting="probs")
    assert not factorable(head) and factorable(random_head())
    with pytest.raises(ValueError, match="logits"):
        FactoredHead(head, SharedNorms(torch.randn(V, D)))
