"""The offline decode loop (runtime.batch_decode) against each prompt alone and against Hugging Face's `generate`.

On the embedded base and on a tiny random Llama (grouped-query attention, RoPE) with large weights, so greedy
text varies token by token and a wrong position, a slot that moved without its keys or a row that reads its
neighbour's cache changes the tokens. Prompts near the context get short budgets, so rows finish at different
steps and the next prompts join a batch that is still decoding, in the slots compaction freed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from heads import BackwardAttentionConfig, BackwardAttentionHead, LinearHead
from heads.base import Base, default_base, load_base
from heads.sampling import FinishReason, SamplingParams
from runtime import batch_decode
from runtime.batch_decode import DecodeResult, decode, new_token_budget
from runtime.runners import SlotKVCache
from tests.conftest import enliven
from training import synth

GREEDY = SamplingParams()
TOP_K = SamplingParams(strategy="top_k", top_k=20, temperature=0.9)
LENGTHS = (3, 17, 5, 250, 9, 244, 30)  # two near the 256-position context: budgets of 6 and 12 at max_new 16


def tiny_llama() -> Base:
    """A random 2-layer Llama, 4 query over 2 key/value heads, as a Base with no tokenizer (decode needs none)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=True)
    model = enliven(LlamaForCausalLM(config)).eval().requires_grad_(False)
    return Base(name="tiny-llama", model=model, tokenizer=None, fingerprint="sha256:tiny-llama", vocab_size=300,
                n_embd=64, n_positions=256)


@pytest.fixture(scope="module", params=["embedded", "tiny-llama"])
def base(request: pytest.FixtureRequest) -> Base:
    return load_base(default_base()) if request.param == "embedded" else tiny_llama()


@pytest.fixture(scope="module")
def prompts(base: Base) -> list[list[int]]:
    """Math text for the trained embedded base (random ids make it repeat one token), random ids for the Llama."""
    if base.tokenizer is None:
        gen = torch.Generator().manual_seed(1)
        return [torch.randint(1, base.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]
    rows = synth.generate(40, 3, "test")
    ids = base.tokenizer(" ".join(f"Problem: {r['problem']}\nSolution: {r['generated_solution']}" for r in rows))
    return [ids["input_ids"][:n] for n in LENGTHS]


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """(decode rows, prefills) of every runner step, and every slot move, recorded as decode runs."""
    seen: list[tuple[int, int]] = []
    real_runner_for, real_move = batch_decode.runner_for, SlotKVCache.move

    def runner_for(model: Any) -> Any:
        runner = real_runner_for(model)
        step = runner.step

        def recording(cache: SlotKVCache, ids: list[int], lengths: list[int], prefills: list[Any]) -> Any:
            seen.append((len(ids), len(prefills)))
            return step(cache, ids, lengths, prefills)

        runner.step = recording  # type: ignore[method-assign]
        return runner

    def move(cache: SlotKVCache, src: int, dst: int, length: int) -> None:
        seen.append((-1, -1))
        real_move(cache, src, dst, length)

    monkeypatch.setattr(batch_decode, "runner_for", runner_for)
    monkeypatch.setattr(SlotKVCache, "move", move)
    yield seen


def hf_greedy(base: Base, prompt: list[int], n: int) -> list[int]:
    """Hugging Face's own greedy `generate` (its cache and masks), never stopping early."""
    config = base.model.generation_config
    eos, config.eos_token_id = config.eos_token_id, None  # an eos_token_id argument of None falls back to it
    try:
        with torch.no_grad():
            out = base.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    finally:
        config.eos_token_id = eos
    return [int(t) for t in out[0, len(prompt):]]


def tokens(results: list[DecodeResult]) -> list[list[int]]:
    return [r.token_ids for r in results]


def test_greedy_with_rows_joining_mid_run_equals_each_alone_and_hf_generate(
        base: Base, prompts: list[list[int]], steps: list[tuple[int, int]]) -> None:
    batched = decode(base, prompts, params=GREEDY, max_new_tokens=16, end_ids=(), max_batch=3)
    assert any(n_decode and n_prefill for n_decode, n_prefill in steps)  # prompts joined rows already decoding
    assert (-1, -1) in steps  # a finished row's slot was refilled by moving the last row into it
    assert [r.n_tokens for r in batched] == [new_token_budget(256, n, 16) for n in LENGTHS]
    assert {r.n_tokens for r in batched} == {6, 12, 16}
    assert all(r.finish_reason is FinishReason.length for r in batched)
    alone = [decode(base, [p], params=GREEDY, max_new_tokens=16, end_ids=())[0] for p in prompts]
    assert tokens(batched) == tokens(alone)
    assert all(len(set(r.token_ids)) > 3 for r in batched)  # not a constant run: equality means something
    for prompt, result in zip(prompts, batched, strict=True):
        assert result.token_ids == hf_greedy(base, prompt, result.n_tokens)


def test_sampled_rows_draw_with_their_own_seed_whatever_the_batch(base: Base, prompts: list[list[int]]) -> None:
    seeds = [100 + i for i in range(len(prompts))]
    batched = decode(base, prompts, params=TOP_K, seed=seeds, max_new_tokens=10, end_ids=(), max_batch=2)
    alone = [decode(base, [p], params=TOP_K, seed=s, max_new_tokens=10, end_ids=())[0] for p, s in zip(
        prompts, seeds, strict=True)]
    assert tokens(batched) == tokens(alone)
    reseeded = decode(base, prompts, params=TOP_K, seed=[s + 1 for s in seeds], max_new_tokens=10, end_ids=())
    assert tokens(reseeded) != tokens(batched)
    greedy = decode(base, prompts, params=GREEDY, max_new_tokens=10, end_ids=())
    assert tokens(greedy) != tokens(batched)  # it did sample
    top1 = decode(base, prompts, params=SamplingParams(strategy="top_k", top_k=1), seed=seeds, max_new_tokens=10,
                  end_ids=())
    assert tokens(top1) == tokens(greedy)


def test_a_row_ends_at_an_end_id_which_it_keeps_while_the_others_run_on(base: Base,
                                                                        prompts: list[list[int]]) -> None:
    reference = decode(base, prompts, params=GREEDY, max_new_tokens=12, end_ids=())
    # A token that row 0 produces after a few steps but some other row never produces.
    stop = next(t for t in reference[0].token_ids[2:] if any(t not in r.token_ids for r in reference[1:]))
    done: list[int] = []
    out = decode(base, prompts, params=GREEDY, max_new_tokens=12, end_ids=[stop], max_batch=4,
                 on_done=lambda i, r: done.append(i))
    assert sorted(done) == list(range(len(prompts))) and done != sorted(done)  # each told once, as it finished
    stopped = 0
    for ref, got in zip(reference, out, strict=True):
        if stop in ref.token_ids:
            stopped += 1
            assert got.token_ids == ref.token_ids[: ref.token_ids.index(stop) + 1]
            assert got.finish_reason is FinishReason.eos
        else:
            assert got.token_ids == ref.token_ids and got.finish_reason is FinishReason.length
    assert 1 <= stopped < len(prompts)
    assert 3 <= out[0].n_tokens < 12


def test_the_context_bounds_a_row_as_on_the_server(base: Base, caplog: pytest.LogCaptureFixture) -> None:
    prompts = [[5] * (base.n_positions - 3), [5] * (base.n_positions - 1), [5] * base.n_positions,
               [7] * (base.n_positions + 10), [5] * 4]
    with caplog.at_level(logging.WARNING, logger="runtime.batch_decode"):
        out = decode(base, prompts, params=GREEDY, max_new_tokens=20, end_ids=(), max_batch=2)
    # The whole sequence fits the context; a prompt that fills it still gets one token, as on the server;
    # a longer one keeps its last n_positions - 1 tokens (logged).
    assert [r.n_tokens for r in out] == [3, 1, 1, 1, 20]
    assert all(r.finish_reason is FinishReason.length for r in out)
    assert "2 prompt(s) longer than the base context" in caplog.text
    clipped = decode(base, [[7] * (base.n_positions - 1)], params=GREEDY, max_new_tokens=20, end_ids=())
    assert out[3].token_ids == clipped[0].token_ids


def test_a_head_decodes_its_own_logits(base: Base, prompts: list[list[int]]) -> None:
    copy = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings)
    copy.prepare(base.embeddings)
    without = decode(base, prompts, params=GREEDY, max_new_tokens=8, end_ids=())
    assert tokens(decode(base, prompts, head=copy, params=GREEDY, max_new_tokens=8, end_ids=())) == tokens(without)
    torch.manual_seed(0)
    other = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16, residual=False),
                                  vocab_size=base.vocab_size, n_embd=base.n_embd)
    other.prepare(base.embeddings)
    batched = decode(base, prompts, head=other, params=GREEDY, max_new_tokens=8, end_ids=(), max_batch=3)
    assert tokens(batched) != tokens(without)
    hidden = base.model.base_model(torch.tensor([prompts[0]])).last_hidden_state[0, -1:]  # (1, D)
    assert batched[0].token_ids[0] == int(other.decode(hidden).argmax())


def test_bad_arguments_are_refused_before_any_work(base: Base) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        decode(base, [[1, 2], []], params=GREEDY, max_new_tokens=4, end_ids=())
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        decode(base, [[1, 2]], params=TOP_K, seed=[1, 2], max_new_tokens=4, end_ids=())
    with pytest.raises(ValueError, match="top_k"):
        decode(base, [[1, 2]], params=SamplingParams(strategy="top_k", top_k=0), max_new_tokens=4, end_ids=())
    with pytest.raises(ValueError, match="max_batch"):
        decode(base, [[1, 2]], params=GREEDY, max_new_tokens=4, end_ids=(), max_batch=0)
    assert decode(base, [], params=GREEDY, max_new_tokens=4, end_ids=()) == []
