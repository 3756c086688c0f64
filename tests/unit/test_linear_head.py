"""LinearHead: the "fine-tune the last layer" baseline sharing the head interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads import LinearConfig, LinearHead
from heads.base import load_base

V, D = 97, 24


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, D, generator=gen), torch.randn(V, D, generator=gen)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_shape_and_parameters(bias: bool) -> None:
    torch.manual_seed(0)
    head = LinearHead(LinearConfig(bias=bias), vocab_size=V, n_embd=D)
    hidden, emb = make_inputs()
    out = head(hidden, emb)
    assert out.shape == (3, 5, V) and out.dtype == torch.float32
    assert torch.equal(out, head(hidden))  # embeddings are accepted for the shared interface, and unused
    assert head.head_type == "linear"
    assert head.proj.weight.shape == (V, D)
    assert (head.proj.bias is not None) == bias
    if bias:
        assert torch.count_nonzero(head.proj.bias) == 0
    assert all(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("bias", [False, True])
def test_init_from_reproduces_base_logits(bias: bool) -> None:
    torch.manual_seed(0)
    head = LinearHead(LinearConfig(bias=bias), vocab_size=V, n_embd=D)
    hidden, emb = make_inputs()
    assert not torch.allclose(head(hidden), hidden @ emb.T, atol=1e-3)  # fresh head is not the base yet
    assert head.init_from(emb) is head
    torch.testing.assert_close(head(hidden), hidden @ emb.T, atol=1e-5, rtol=1e-5)
    assert head.proj.weight.data_ptr() != emb.data_ptr()  # a copy, so training never touches the base
    with torch.no_grad():
        head.proj.weight.add_(1.0)
    assert not torch.equal(head.proj.weight, emb)


def test_init_from_real_base_matches_its_lm_head(tiny_base_dir) -> None:  # type: ignore[no-untyped-def]
    base = load_base(str(tiny_base_dir))
    head = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings)
    hidden = base.hidden_states(torch.randint(0, base.vocab_size, (2, 6))).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), base.linear_logits(hidden), atol=1e-6, rtol=1e-6)
    assert head.proj.weight.requires_grad and not base.embeddings.requires_grad


@pytest.mark.parametrize("bias", [False, True])
def test_decode_equals_forward_last_position(bias: bool) -> None:
    torch.manual_seed(0)
    head = LinearHead(LinearConfig(bias=bias), vocab_size=V, n_embd=D)
    if bias:
        with torch.no_grad():
            head.proj.bias.normal_()
    hidden, emb = make_inputs()
    head.eval()
    head.prepare(emb)  # a no-op, but part of the shared interface
    with torch.no_grad():
        full = head(hidden, emb)
    step = head.decode(hidden[:, -1])
    assert step.shape == (3, V)
    torch.testing.assert_close(step, full[:, -1], atol=1e-6, rtol=1e-6)
    head.release()
    torch.testing.assert_close(head.decode(hidden[:, -1]), step)  # nothing cached, nothing to lose


@pytest.mark.parametrize("shape", [(V + 1, D), (V, D + 1), (D, V), (V,)])
def test_init_from_rejects_wrong_shape(shape: tuple[int, ...]) -> None:
    head = LinearHead(vocab_size=V, n_embd=D)
    before = head.proj.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"embeddings must be \({V}, {D}\)"):
        head.init_from(torch.zeros(shape))
    assert torch.equal(head.proj.weight, before)


def test_config_and_size_validation() -> None:
    LinearConfig().validate()
    with pytest.raises(ValueError, match="bias"):
        LinearHead(LinearConfig(bias="yes"), vocab_size=V, n_embd=D)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size"):
        LinearHead(vocab_size=0, n_embd=D)
    with pytest.raises(ValueError, match="n_embd"):
        LinearHead(vocab_size=V, n_embd=0)


def test_gradients_reach_weights() -> None:
    torch.manual_seed(0)
    head = LinearHead(LinearConfig(bias=True), vocab_size=V, n_embd=D)
    hidden, emb = make_inputs()
    target = torch.randint(0, V, (15,), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(head(hidden, emb).reshape(-1, V), target).backward()
    assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0
    assert head.proj.bias.grad is not None and head.proj.bias.grad.abs().sum() > 0
