"""Every registered head kind keeps the one contract (`heads.HeadModule`) that training and serving rely on: the
generative kinds decode what `forward` gives; a kind that does not generate (the classifier) says so and refuses
to decode (its own contract is in tests/unit/test_classifier_head.py)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from heads import HeadModule, get_head_type, head_type_names
from tests.unit.head_factories import D, V


def _prepared(kind: str) -> tuple[HeadModule, Tensor]:
    torch.manual_seed(0)
    spec = get_head_type(kind)
    head = spec.module_cls(spec.config_cls(), vocab_size=V, n_embd=D).eval()
    with torch.no_grad():  # move every weight off its initial value, so no term of the logits is zero
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    embeddings = torch.randn(V, D)
    head.prepare(embeddings)
    return head, embeddings


def test_the_known_kinds_are_registered() -> None:
    assert {"backward_attention", "linear", "lowrank"} <= set(head_type_names(generative=True))
    assert head_type_names(generative=False) == ["classifier"]
    assert sorted(head_type_names(generative=True) + head_type_names(generative=False)) == head_type_names()


@pytest.mark.parametrize("kind", head_type_names(generative=True))
def test_kind_is_a_head_module_named_as_registered(kind: str) -> None:
    head, _ = _prepared(kind)
    assert isinstance(head, HeadModule) and type(head).head_type == kind
    assert type(head).generative and get_head_type(kind).generative


@pytest.mark.parametrize("kind", head_type_names(generative=False))
def test_a_kind_that_does_not_generate_refuses_to_decode(kind: str) -> None:
    spec = get_head_type(kind)
    assert not spec.generative and spec.module_cls.head_type == kind
    head = spec.module_cls(spec.config_cls(labels=["no", "yes"]), vocab_size=V, n_embd=D)
    for call in (lambda: head.prepare(torch.randn(V, D)), lambda: head.decode(torch.randn(2, D))):
        with pytest.raises(TypeError, match=kind):
            call()


@pytest.mark.parametrize("kind", head_type_names(generative=True))
def test_decode_equals_forward_with_or_without_the_base_logits(kind: str) -> None:
    """The server passes the base's logits exactly when `accepts_base_logits` says so; either way the
    logits are forward()'s, so a head never depends on which path the server took."""
    head, embeddings = _prepared(kind)
    hidden = torch.randn(5, D)
    with torch.no_grad():
        reference = head(hidden[:, None], embeddings)[:, 0]  # (5, V)
    plain = head.decode(hidden)
    given = head.decode(hidden, base_logits=hidden @ embeddings.T)
    assert plain.shape == (5, V) and reference.abs().max().item() > 1e-2
    assert torch.allclose(plain, reference, atol=1e-4) and torch.allclose(given, reference, atol=1e-4)
    # The flag is honest: wrong base logits change the answer exactly when the head says it uses them.
    wrong = head.decode(hidden, base_logits=torch.zeros(5, V))
    assert torch.allclose(wrong, reference, atol=1e-4) != head.accepts_base_logits


def test_a_kind_missing_part_of_the_contract_cannot_be_built() -> None:
    class NoDecode(HeadModule):
        def forward(self, hidden: Tensor, embeddings: Tensor) -> Tensor:
            return hidden @ embeddings.T

        def prepare(self, embeddings: Tensor) -> None:
            pass

        def release(self) -> None:
            pass

    with pytest.raises(TypeError, match="decode"):
        NoDecode()
