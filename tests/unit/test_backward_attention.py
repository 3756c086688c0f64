"""BackwardAttentionHead: the folded decode path, chunking, gradients, residual init and config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heads import BackwardAttentionConfig, BackwardAttentionHead
from heads.base import load_base
from tests.unit.head_factories import D, V, make_head


def make_inputs(seed: int = 0, batch: int = 3, steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, D, generator=gen), torch.randn(V, D, generator=gen)


@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("latent_dim", [None, 16])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("weighting", ["logits", "probs"])
def test_decode_equals_forward(weighting: str, residual: bool, latent_dim: int | None, num_heads: int) -> None:
    head = make_head(weighting=weighting, residual=residual, latent_dim=latent_dim, num_heads=num_heads).eval()
    hidden, emb = make_inputs()
    with torch.no_grad():
        full = head(hidden, emb)
    head.prepare(emb)
    assert (head._fold is not None) == (weighting == "logits")  # the fold is what makes "logits" cheap
    last = head.decode(hidden[:, -1])
    assert last.shape == (3, V) and last.dtype == torch.float32
    assert (last - full[:, -1]).abs().max().item() <= 1e-4
    every = head.decode(hidden.reshape(-1, D)).reshape(3, 5, V)  # every position, not just the last
    assert (every - full).abs().max().item() <= 1e-4
    assert full.abs().max().item() > 1e-2  # outputs are not trivially zero


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("weighting", ["logits", "probs"])
def test_decode_reuses_given_base_logits(weighting: str, residual: bool) -> None:
    """A server passes the base's logits it computed once for the batch; the result must not change."""
    head = make_head(weighting=weighting, residual=residual).eval()
    hidden, emb = make_inputs()
    head.prepare(emb)
    last = hidden[:, -1]
    torch.testing.assert_close(head.decode(last, base_logits=last @ emb.T), head.decode(last))


def test_prepare_keeps_the_base_embeddings_out_of_the_head() -> None:
    """The base's embedding Parameter must not become a parameter (or saved tensor) of the head."""
    head = make_head(residual=True).eval()
    embeddings = nn.Parameter(make_inputs()[1], requires_grad=False)
    names = sorted(head.state_dict())
    head.prepare(embeddings)
    assert sorted(head.state_dict()) == names
    assert all(p is not embeddings for p in head.parameters())


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("weighting", ["logits", "probs"])
def test_decode_equals_forward_after_optimizer_step(weighting: str, residual: bool) -> None:
    head = make_head(weighting=weighting, residual=residual, latent_dim=16, num_heads=2)
    hidden, emb = make_inputs()
    head.eval()
    head.prepare(emb)
    before = head.decode(hidden[:, -1])

    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    target = torch.randint(0, V, (3 * 5,), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(head(hidden, emb).reshape(-1, V), target).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="prepare"):
        head.decode(hidden[:, -1])  # train() dropped the now-stale caches

    head.eval()
    head.prepare(emb)
    after = head.decode(hidden[:, -1])
    with torch.no_grad():
        full = head(hidden, emb)
    assert (after - full[:, -1]).abs().max().item() <= 1e-4
    assert (after - before).abs().max().item() > 1e-3  # the step really moved the head


def test_decode_before_prepare_raises() -> None:
    head = make_head().eval()
    hidden, _ = make_inputs()
    with pytest.raises(RuntimeError, match="prepare"):
        head.decode(hidden[:, -1])


def test_train_drops_caches() -> None:
    head = make_head(weighting="probs", residual=True)
    hidden, emb = make_inputs()
    head.eval()
    head.prepare(emb)
    head.decode(hidden[:, -1])
    assert head._key_cache is not None and head._embeddings is not None and head._value_cache is not None
    head.train()
    assert head._key_cache is None and head._fold is None and head._value_cache is None and head._embeddings is None
    with pytest.raises(RuntimeError, match="prepare"):
        head.decode(hidden[:, -1])


@pytest.mark.parametrize("chunk_size", [1, 10, 13, 97, 500])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("weighting", ["logits", "probs"])
def test_chunked_equals_unchunked(weighting: str, residual: bool, chunk_size: int) -> None:
    cfg = dict(weighting=weighting, residual=residual, latent_dim=16, num_heads=2)
    whole = make_head(**cfg)
    chunked = make_head(randomize=False, chunk_size=chunk_size, **cfg)
    chunked.load_state_dict(whole.state_dict())
    hidden, emb = make_inputs()

    out_whole, out_chunked = whole(hidden, emb), chunked(hidden, emb)
    torch.testing.assert_close(out_chunked, out_whole, atol=1e-5, rtol=1e-5)
    out_whole.square().mean().backward()
    out_chunked.square().mean().backward()
    for (name, p), q in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"grad of {name}")

    whole.eval().prepare(emb)
    chunked.eval().prepare(emb)
    torch.testing.assert_close(chunked.decode(hidden[:, -1]), whole.decode(hidden[:, -1]), atol=1e-5, rtol=1e-5)
    assert (chunked.decode(hidden[:, -1]) - out_whole[:, -1].detach()).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir):  # type: ignore[no-untyped-def]
    return load_base(str(tiny_base_dir))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("weighting", ["logits", "probs"])
def test_gradients_reach_only_head_parameters(tiny_base, weighting: str, residual: bool) -> None:  # type: ignore[no-untyped-def]
    base = tiny_base
    assert all(not p.requires_grad for p in base.model.parameters())
    assert not base.model.training
    torch.manual_seed(0)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16, num_heads=2, weighting=weighting,
                                                         residual=residual),
                                 vocab_size=base.vocab_size, n_embd=base.n_embd)
    ids = torch.randint(0, base.vocab_size, (2, 7))
    with torch.enable_grad():
        hidden = base.hidden_states(ids).last_hidden_state
        logits = head(hidden, base.embeddings)
        assert logits.shape == (2, 7, base.vocab_size)
        F.cross_entropy(logits[:, :-1].reshape(-1, base.vocab_size), ids[:, 1:].reshape(-1)).backward()

    assert all(p.grad is None for p in base.model.parameters())
    grads = {name: p.grad for name, p in head.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    if residual:
        # Zero-initialised query: only query and alpha learn on the first step; the rest sees no signal yet.
        assert set(grads) == {"norm.weight", "latent.weight", "key.weight", "value.weight", "query.weight", "alpha"}
        assert grads["query.weight"].abs().sum() > 0 and grads["alpha"].abs() > 0
        for name in ("norm.weight", "latent.weight", "key.weight", "value.weight"):
            assert torch.count_nonzero(grads[name]) == 0, name
    else:
        assert set(grads) == {"norm.weight", "latent.weight", "key.weight", "value.weight", "query.weight"}
        for name, g in grads.items():
            assert g.abs().sum() > 0, name


@pytest.mark.parametrize("weighting", ["logits", "probs"])
def test_residual_head_starts_as_base_logits(tiny_base, weighting: str) -> None:  # type: ignore[no-untyped-def]
    head = BackwardAttentionHead(BackwardAttentionConfig(weighting=weighting, residual=True),
                                 vocab_size=tiny_base.vocab_size, n_embd=tiny_base.n_embd).eval()
    emb = tiny_base.embeddings
    hidden = tiny_base.hidden_states(torch.randint(0, tiny_base.vocab_size, (2, 6))).last_hidden_state
    with torch.no_grad():
        out = head(hidden, emb)
    assert torch.count_nonzero(head.query.weight) == 0
    assert torch.equal(out, hidden @ emb.T)
    torch.testing.assert_close(out, tiny_base.linear_logits(hidden), atol=1e-5, rtol=1e-5)
    head.prepare(emb)
    torch.testing.assert_close(head.decode(hidden[:, -1]), hidden[:, -1] @ emb.T, atol=1e-5, rtol=1e-5)


def test_head_dim_sets_inner_width() -> None:
    head = make_head(latent_dim=16, num_heads=3, head_dim=5)
    assert head.key.weight.shape == (15, 16) and head.value.weight.shape == (15, 16)
    assert head.query.weight.shape == (15, 15)
    hidden, emb = make_inputs()
    with torch.no_grad():
        full = head.eval()(hidden, emb)
    head.prepare(emb)
    assert (head.decode(hidden[:, -1]) - full[:, -1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("field", "value"), [
    ("weighting", "softmax"),
    ("num_heads", 0),
    ("num_heads", -2),
    ("num_heads", 2.0),
    ("chunk_size", -1),
    ("chunk_size", 0),
    ("latent_dim", 0),
    ("latent_dim", -8),
    ("head_dim", 0),
    ("residual", "yes"),
    ("eps", 0.0),
    ("eps", -1e-6),
])
def test_config_validation_names_field(field: str, value: object) -> None:
    cfg = BackwardAttentionConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        BackwardAttentionHead(cfg, vocab_size=V, n_embd=D)


def test_default_config_is_valid_and_sizes_are_checked() -> None:
    BackwardAttentionConfig().validate()
    with pytest.raises(ValueError, match="vocab_size"):
        BackwardAttentionHead(vocab_size=0, n_embd=D)
    head = make_head()
    hidden, emb = make_inputs()
    with pytest.raises(ValueError, match="embeddings"):
        head(hidden, emb[:-1])
    with pytest.raises(ValueError, match="hidden"):
        head(hidden[..., :-1], emb)
    with pytest.raises(ValueError, match="embeddings"):
        head.prepare(emb.T)
