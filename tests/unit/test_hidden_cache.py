"""The cached target states are the base's own states at the scoring positions, and chunking changes no loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from heads import BackwardAttentionConfig, BackwardAttentionHead, LinearHead
from heads.base import load_base
from training import hidden_cache
from training.data import collate
from training.hidden_cache import chunked_cross_entropy, target_states


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base(str(tiny_base_dir))


def encoded_examples(vocab: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(3, vocab, (n,), generator=g).tolist(), p) for n, p in ((12, 4), (7, 6), (20, 3), (9, 2))]


def test_states_are_the_bases_states_at_every_scoring_position(base, tmp_path) -> None:
    encoded = encoded_examples(base.vocab_size)
    states = target_states(base, encoded, cache_dir=tmp_path)
    assert len(states) == 4 and states.n_targets == sum(len(ids) - p for ids, p in encoded)
    for i, (ids, prompt_len) in enumerate(encoded):
        with torch.no_grad():
            full = base.hidden_states(torch.tensor([ids])).last_hidden_state[0]  # alone, no padding
        hidden, targets = states.rows([i])
        torch.testing.assert_close(hidden, full[prompt_len - 1: len(ids) - 1], atol=2e-3, rtol=2e-3)  # float16
        assert targets.tolist() == ids[prompt_len:]


def test_a_second_pass_is_read_from_disk_and_equal(base, tmp_path, monkeypatch) -> None:
    encoded = encoded_examples(base.vocab_size)
    first = target_states(base, encoded, cache_dir=tmp_path)
    monkeypatch.setattr(hidden_cache, "compute", lambda *a, **k: pytest.fail("the base ran again"))
    again = target_states(base, encoded, cache_dir=tmp_path)
    assert again.from_disk and not first.from_disk
    assert isinstance(again.hidden, np.memmap)  # memory-mapped, not read into memory
    np.testing.assert_array_equal(np.asarray(again.hidden), first.hidden)
    np.testing.assert_array_equal(again.targets, first.targets)
    other = encoded[:3]  # other data: another key, so never the first pass's states
    assert hidden_cache.cache_key(base, other) != hidden_cache.cache_key(base, encoded)


def test_a_damaged_pass_on_disk_is_recomputed(base, tmp_path) -> None:
    encoded = encoded_examples(base.vocab_size)
    target_states(base, encoded, cache_dir=tmp_path)
    folder = tmp_path / "hidden" / hidden_cache.cache_key(base, encoded)
    (folder / "offsets.npy").write_bytes(b"not numpy")
    states = target_states(base, encoded, cache_dir=tmp_path)
    assert not states.from_disk and states.n_targets == sum(len(ids) - p for ids, p in encoded)


@pytest.mark.parametrize("kind", ["backward_attention", "linear"])
def test_chunked_loss_and_gradients_equal_the_whole_batch(kind) -> None:
    torch.manual_seed(0)
    V, D, N = 50, 12, 37

    def make():
        torch.manual_seed(1)
        if kind == "linear":
            return LinearHead(vocab_size=V, n_embd=D)
        head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, residual=True), vocab_size=V, n_embd=D)
        torch.nn.init.normal_(head.query.weight)
        return head

    hidden, embeddings, targets = torch.randn(N, D), torch.randn(V, D), torch.randint(0, V, (N,))
    whole, chunked = make(), make()
    loss = F.cross_entropy(whole(hidden[None], embeddings)[0], targets)
    loss.backward()
    total, n = chunked_cross_entropy(chunked, hidden, targets, embeddings, chunk_rows=8, backward=True)
    assert n == N and total / n == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_base_head_loss_and_temperature() -> None:
    torch.manual_seed(0)
    hidden, embeddings, targets = torch.randn(9, 6), torch.randn(20, 6), torch.randint(0, 20, (9,))
    total, n = chunked_cross_entropy(None, hidden, targets, embeddings, chunk_rows=4, temperature=0.5)
    expected = F.cross_entropy((hidden @ embeddings.T) / 0.5, targets, reduction="sum")
    assert n == 9 and total == pytest.approx(expected.item(), rel=1e-5)


def test_collate_and_states_agree_on_which_positions_score(base) -> None:
    encoded = encoded_examples(base.vocab_size)
    _, _, labels = collate(encoded, 0)
    states = hidden_cache.compute(base, encoded)
    assert states.n_targets == int((labels[:, 1:] != -100).sum())
