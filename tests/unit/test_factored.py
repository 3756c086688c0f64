"""The factored form of a backward-attention head gives the prepared head's logits without its keys."""

from __future__ import annotations

import pytest
import torch

from heads.factored import FactoredHead, SharedNorms, factorable
from tests.unit.head_factories import D, V, make_head


@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("latent_dim", [None, 16])
@pytest.mark.parametrize("residual", [True, False])
def test_factored_logits_equal_the_prepared_head(residual: bool, latent_dim: int | None, num_heads: int) -> None:
    head = make_head(residual=residual, latent_dim=latent_dim, num_heads=num_heads).eval()
    embeddings, hidden = torch.randn(V, D), torch.randn(6, D)
    factored = FactoredHead(head, SharedNorms(embeddings))
    head.prepare(embeddings)
    expected = head.decode(hidden)
    assert (factored.decode(hidden, embeddings) - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 1e-1
    assert factored.accepts_base_logits == residual


def test_factored_head_keeps_no_vocabulary_sized_tensor() -> None:
    head = make_head(residual=True, latent_dim=16, num_heads=2)
    embeddings = torch.randn(V, D)
    factored = FactoredHead(head, SharedNorms(embeddings))
    assert factored.resident_bytes() == 2 * D * head.query.in_features * 4  # fold and expansion, D x H*d each
    head.prepare(embeddings)
    assert head._key_cache is not None and head._key_cache.shape == (V, head.query.in_features)


def test_probs_weighting_is_not_factorable() -> None:
    head = make_head(weighting="probs")
    assert not factorable(head) and factorable(make_head())
    with pytest.raises(ValueError, match="logits"):
        FactoredHead(head, SharedNorms(torch.randn(V, D)))
