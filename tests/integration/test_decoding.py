"""Evaluation's decoding (the server's runner, batched) must match the slow, obvious computations it replaces."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from heads import LinearHead
from heads.base import Base, load_base
from training.data import encode, load_examples
from training.decoding import generate, target_cross_entropy

TEXTS = ["Problem: Ava has 3", "Sam", "Problem: Ben buys 12 more apples. How many apples", "Problem: x"]


@pytest.fixture(scope="module")
def base(lively_base_dir: Path) -> Base:
    return load_base(str(lively_base_dir))


@pytest.fixture(scope="module")
def prompts(base: Base) -> list[list[int]]:
    out = [base.tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in out}) == len(out), "prompts must differ in length to exercise ragged batches"
    return out


def naive_greedy(base: Base, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Full recomputation every step, no cache, no padding: the definition of greedy decoding."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = base.model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] == base.tokenizer.eos_token_id:
            break
    return ids[len(prompt):]


def test_batched_greedy_equals_each_prompt_alone(base: Base, prompts: list[list[int]]) -> None:
    batched = generate(base, prompts, max_new_tokens=12, batch_size=4)
    alone = [generate(base, [p], max_new_tokens=12)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) == len(prompts)  # results are not shuffled or shared
    assert all(len(set(g.token_ids)) > 3 for g in batched)  # the comparison is not between constant runs


def test_greedy_equals_naive_full_recomputation(base: Base, prompts: list[list[int]]) -> None:
    for prompt in prompts[:2]:
        assert generate(base, [prompt], max_new_tokens=10)[0].token_ids == naive_greedy(base, prompt, 10)


def test_linear_head_copy_decodes_like_the_base(base: Base, prompts: list[list[int]]) -> None:
    head = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings)
    with_head = generate(base, prompts, head=head, max_new_tokens=10)
    without = generate(base, prompts, max_new_tokens=10)
    assert [g.token_ids for g in with_head] == [g.token_ids for g in without]


def test_top_k_is_reproducible_whatever_the_batching_and_top_1_is_greedy(base: Base, prompts: list[list[int]]) -> None:
    first = generate(base, prompts, strategy="top_k", top_k=50, seed=7, max_new_tokens=12)
    again = generate(base, prompts, strategy="top_k", top_k=50, seed=7, max_new_tokens=12)
    other = generate(base, prompts, strategy="top_k", top_k=50, seed=8, max_new_tokens=12)
    assert [g.text for g in first] == [g.text for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]
    one_by_one = generate(base, prompts, strategy="top_k", top_k=50, seed=7, max_new_tokens=12, batch_size=1)
    assert [g.token_ids for g in one_by_one] == [g.token_ids for g in first]  # each example has its own generator
    top1 = generate(base, prompts, strategy="top_k", top_k=1, seed=3, max_new_tokens=12)
    greedy = generate(base, prompts, max_new_tokens=12)
    assert [g.token_ids for g in top1] == [g.token_ids for g in greedy]


def test_length_limit_sets_finish_reason(base: Base, prompts: list[list[int]]) -> None:
    out = generate(base, prompts, max_new_tokens=5)
    assert all(g.finish_reason == "length" and g.n_tokens == 5 == len(g.token_ids) for g in out)


def test_base_context_bounds_generation(base: Base) -> None:
    near_full = [5] * (base.n_positions - 3)
    too_long = [5] * (base.n_positions + 10)
    out = generate(base, [near_full, too_long], max_new_tokens=20)
    assert [g.n_tokens for g in out] == [3, 1]
    assert all(g.finish_reason == "length" for g in out)


class _EosTokenizer:
    """The real tokenizer, but reporting another id as EOS, to stop rows at a chosen point."""

    def __init__(self, tokenizer: Any, eos_token_id: int) -> None:
        self._tokenizer, self.eos_token_id = tokenizer, eos_token_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def test_rows_stop_at_eos_without_disturbing_the_others(base: Base, prompts: list[list[int]]) -> None:
    reference = generate(base, prompts, max_new_tokens=12)
    # A token that row 0 produces after a few steps but some other row never produces.
    stop = next(t for t in reference[0].token_ids[2:] if any(t not in r.token_ids for r in reference[1:]))
    eos_base = dataclasses.replace(base, tokenizer=_EosTokenizer(base.tokenizer, stop))
    out = generate(eos_base, prompts, max_new_tokens=12, batch_size=4)
    stopped = 0
    for ref, got in zip(reference, out, strict=True):
        if stop in ref.token_ids:
            stopped += 1
            assert got.token_ids == ref.token_ids[: ref.token_ids.index(stop) + 1]
            assert got.finish_reason == "eos"
        else:
            assert got.token_ids == ref.token_ids and got.finish_reason == "length"
    assert 1 <= stopped < len(prompts)  # some rows stopped early while others ran on
    assert 3 <= out[0].n_tokens < 12


def test_target_cross_entropy_matches_hf_loss(base: Base, synth_dir: Path) -> None:
    examples, _ = load_examples(str(synth_dir), "test", limit=5)
    encoded, _ = encode(examples, base.tokenizer, max_len=base.n_positions)
    total, count = target_cross_entropy(base, encoded, batch_size=2)
    assert count == sum(len(ids) - prompt_len for ids, prompt_len in encoded)
    hf_total = 0.0
    for ids, prompt_len in encoded:  # one at a time: HF's mean over target tokens, unpadded
        labels = torch.tensor([[-100] * prompt_len + ids[prompt_len:]])
        with torch.no_grad():
            loss = base.model(torch.tensor([ids]), labels=labels).loss
        hf_total += float(loss) * (len(ids) - prompt_len)
    assert total / count == pytest.approx(hf_total / count, abs=1e-5)
    head = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings)
    head_total, head_count = target_cross_entropy(base, encoded, head=head, batch_size=3)
    assert head_count == count and head_total / count == pytest.approx(total / count, abs=1e-5)
