"""The ragged runners against Hugging Face's own forward, on tiny random Llama-family models (no weights).

Each check would fail on a real mistake: wrong RoPE positions (a decode row at the wrong offset, positions
lost when a slot moves), a key/value head paired with the wrong query heads, a missing q/k/v bias, RoPE
scaling ignored, a sequence's output depending on its neighbours. The models get large random weights
(biases and norm gains included), so greedy decodes vary token to token and a wrong detail changes them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from heads.errors import UnsupportedBaseError
from runtime.runners import Prefill, RaggedGPT2, RaggedLlama, SlotKVCache, runner_for

VOCAB = 96
# 4 query heads over 2 key/value heads (grouped-query attention), a small context, tied embeddings.
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
MODELS: dict[str, Any] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 5000.0})),
    # head_dim 24 is not hidden / heads (16); linear RoPE scaling halves every position.
    "llama-linear-rope": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, head_dim=24, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 777.0})),
    "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 50000.0})),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),  # q/k/v biases
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)),
}


def lively(make: Any, seed: int = 0) -> Any:
    """A model with large random weights, biases and norm gains, frozen and in eval mode like a loaded base."""
    torch.manual_seed(seed)
    model = make().eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.3 if p.dim() == 2 else (1 + 0.2 * noise if "norm" in name else 0.2 * noise))
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> Any:
    return lively(MODELS[request.param])


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_last(model: Any, ids: list[int]) -> tuple[Tensor, Tensor]:
    """HF's own forward over the whole sequence: the last position's final hidden state and logits."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1], out.logits[0, -1]


def assert_matches_hf(model: Any, hidden: Tensor, sequences: list[list[int]]) -> None:
    for row, ids in enumerate(sequences):
        want_hidden, want_logits = hf_last(model, ids)
        torch.testing.assert_close(hidden[row], want_hidden, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.lm_head(hidden[row]), want_logits, atol=1e-4, rtol=1e-4)


def runner_prefill(model: Any, ids: list[int]) -> Tensor:
    """The runner's final hidden state for one prompt alone."""
    runner = runner_for(model)
    cache = runner.new_cache(1)
    cache.ensure(len(ids))
    return runner.step(cache, [], [], [Prefill(ids, [0])])[0]


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from HF's full forward at every step (no cache at all: nothing shared with the runner)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(hf_last(model, ids)[1].argmax()))
    return ids[-n:]


def engine_greedy(model: Any, prompts: list[list[int]], lengths: list[int], joins: list[int],
                  cache: SlotKVCache | None = None) -> list[list[int]]:
    """Greedy decodes run the way server.engine runs them: prompt i joins at step joins[i]; a finished sequence
    leaves at once and the last slot moves into its place (cache.move)."""
    runner = runner_for(model)
    cache = cache or runner.new_cache(len(prompts))
    out: list[list[int]] = [[] for _ in prompts]
    cached = [0] * len(prompts)
    active: list[int] = []  # active[s]: the sequence in slot s
    for step in range(max(joins) + max(lengths) + 1):
        newcomers = [i for i, j in enumerate(joins) if j == step]
        decoding = list(active)
        if not decoding and not newcomers:
            continue
        cache.ensure(max([cached[i] + 1 for i in decoding] + [len(prompts[i]) for i in newcomers]))
        prefills = [Prefill(prompts[i], [len(decoding) + k]) for k, i in enumerate(newcomers)]
        hidden = runner.step(cache, [out[i][-1] for i in decoding], [cached[i] for i in decoding], prefills)
        for i in decoding:
            cached[i] += 1
        for i in newcomers:
            cached[i] = len(prompts[i])
        active = decoding + newcomers
        for row, i in enumerate(active):
            out[i].append(int(model.lm_head(hidden[row]).argmax()))
        for slot in range(len(active) - 1, -1, -1):
            if len(out[active[slot]]) == lengths[active[slot]]:
                last = len(active) - 1
                if slot != last:
                    cache.move(last, slot, cached[active[last]])
                    active[slot] = active[last]
                active.pop()
    return out


def test_ragged_step_matches_the_hf_forward(model: Any) -> None:
    """Prompts of different lengths, then decode rows with a newcomer joining, then decode steps: every row's
    hidden state and logits equal HF's forward over that row's whole sequence."""
    runner = runner_for(model)
    assert isinstance(runner, RaggedLlama)
    cache = runner.new_cache(4)
    cache.ensure(64)
    first, second, late = prompt(1, 5), prompt(2, 11), prompt(3, 7)
    hidden = runner.step(cache, [], [], [Prefill(first, [0]), Prefill(second, [1, 2])])
    assert_matches_hf(model, hidden, [first, second])
    seqs = [first + [5], second + [6], second + [7]]
    hidden = runner.step(cache, [5, 6, 7], [len(first), len(second), len(second)], [Prefill(late, [3])])
    seqs.append(list(late))
    assert_matches_hf(model, hidden, seqs)
    for _ in range(3):  # all four decoding, each from its own position
        nxt = [int(model.lm_head(h).argmax()) for h in hidden]
        hidden = runner.step(cache, nxt, [len(s) for s in seqs], [])
        seqs = [s + [t] for s, t in zip(seqs, nxt, strict=True)]
        assert_matches_hf(model, hidden, seqs)


def test_gqa_and_rope_positions_stay_right_after_a_slot_moves(model: Any) -> None:
    """The engine's compaction: slot 0 leaves, the last slot moves into it, and decoding goes on exactly."""
    runner = runner_for(model)
    cache = runner.new_cache(3)
    cache.ensure(40)
    seqs = [prompt(4, 5), prompt(5, 9), prompt(6, 14)]
    hidden = runner.step(cache, [], [], [Prefill(s, [i]) for i, s in enumerate(seqs)])
    for _ in range(2):
        nxt = [int(model.lm_head(h).argmax()) for h in hidden]
        hidden = runner.step(cache, nxt, [len(s) for s in seqs], [])
        seqs = [s + [t] for s, t in zip(seqs, nxt, strict=True)]
    cache.move(2, 0, len(seqs[2]))  # sequence 0 left: the longest sequence moves from slot 2 to slot 0
    seqs, hidden = [seqs[2], seqs[1]], hidden[[2, 1]]
    for _ in range(3):
        nxt = [int(model.lm_head(h).argmax()) for h in hidden]
        hidden = runner.step(cache, nxt, [len(s) for s in seqs], [])
        seqs = [s + [t] for s, t in zip(seqs, nxt, strict=True)]
        assert_matches_hf(model, hidden, seqs)


def test_greedy_outputs_are_batch_invariant_and_equal_hf(model: Any) -> None:
    """Each prompt decoded alone gives the tokens it gives in a batch where others join and leave around it
    (slots move), and those are HF's greedy tokens."""
    prompts = [prompt(10 + i, n) for i, n in enumerate([3, 12, 7, 1, 9])]
    lengths, joins = [4, 10, 3, 8, 6], [0, 0, 1, 1, 4]
    moves: list[tuple[int, int, int]] = []

    class Watched(SlotKVCache):
        def move(self, src: int, dst: int, length: int) -> None:
            moves.append((src, dst, length))
            super().move(src, dst, length)

    runner = runner_for(model)
    probe = runner.new_cache(1)
    cache = Watched(probe.n_layer, probe.n_kv_heads, probe.head_dim, len(prompts), probe.max_positions,
                    probe.dtype, probe.device)
    together = engine_greedy(model, prompts, lengths, joins, cache)
    alone = [engine_greedy(model, [p], [n], [0])[0] for p, n in zip(prompts, lengths, strict=True)]
    assert moves  # the batch really compacted its slots
    assert together == alone
    assert alone == [hf_greedy(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    assert len({t for out in alone for t in out}) > 8  # the decodes vary: equality means something


def test_the_cache_stores_key_value_heads_only() -> None:
    model = lively(MODELS["llama-linear-rope"])
    cache = runner_for(model).new_cache(2)
    cache.ensure(1)
    assert cache.keys[0].shape == (2, 2, 64, 24)  # (slots, KV heads, capacity, head_dim)


def test_qwen2_biases_are_used() -> None:
    """Qwen2's q/k/v biases come with its modules; zeroing them changes the runner's output."""
    model = lively(MODELS["qwen2"])
    ids = prompt(7, 6)
    before = runner_prefill(model, ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.zero_()
    after = runner_prefill(model, ids)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, hf_last(model, ids)[0], atol=1e-4, rtol=1e-4)


def test_runners_are_chosen_by_model_type(tiny_base_dir: Any) -> None:
    from transformers import AutoModelForCausalLM

    assert isinstance(runner_for(AutoModelForCausalLM.from_pretrained(tiny_base_dir)), RaggedGPT2)
    for name in ("llama", "qwen2", "mistral"):
        assert isinstance(runner_for(lively(MODELS[name])), RaggedLlama)


def test_an_unsupported_model_type_names_the_supported_ones() -> None:
    other = nn.Module()
    other.config = SimpleNamespace(model_type="falcon")  # type: ignore[assignment]
    with pytest.raises(UnsupportedBaseError, match="'falcon'.*supported model types: gpt2, llama, mistral, qwen2"):
        runner_for(other)
    with pytest.raises(UnsupportedBaseError, match="None"):
        runner_for(nn.Linear(2, 2))


@pytest.mark.parametrize(("make", "option"), [
    (lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=32)), "sliding_window"),
    (lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=32, max_window_layers=1)),
     "use_sliding_window"),
])
def test_an_active_sliding_window_is_refused_by_name(make: Any, option: str) -> None:
    with pytest.raises(UnsupportedBaseError, match=f"sliding-window attention \\({option}: a 32-token window"):
        runner_for(make())


def test_a_window_as_long_as_the_context_is_no_window() -> None:
    model = lively(lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=128)))
    ids = prompt(8, 9)
    torch.testing.assert_close(runner_prefill(model, ids), hf_last(model, ids)[0], atol=1e-4, rtol=1e-4)


def test_what_the_runner_cannot_honour_is_refused() -> None:
    longrope = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 64, "rope_theta": 10000.0}))
    with pytest.raises(UnsupportedBaseError, match="rope_type 'longrope'"):
        runner_for(longrope)
    normed = lively(MODELS["llama"])
    normed.model.layers[1].self_attn.q_norm = nn.LayerNorm(16)  # a Qwen3/OLMo-style q norm the runner would skip
    with pytest.raises(UnsupportedBaseError, match=r"layer 1 \(LlamaAttention\).*unknown \['q_norm'\]"):
        runner_for(normed)


def hf_final(model: Any, ids: list[int]) -> Tensor:
    """HF's last_hidden_state over the whole prompt: (T, D)."""
    with torch.no_grad():
        return model.base_model(torch.tensor([ids])).last_hidden_state[0]


def assert_pools_like_hf(model: Any) -> None:
    """A step mixing a decode row, a prompt that decodes and two classifications (prefills with no slot, one asking
    for its mean): the mean rows come after the rest and equal the mean of HF's last_hidden_state over each prompt,
    every other row is what it is without them, and a prefill with no slot writes no cache row."""
    runner = runner_for(model)
    cache = runner.new_cache(2)
    cache.ensure(32)
    first, second, pooled, plain = prompt(20, 6), prompt(21, 9), prompt(22, 13), prompt(23, 4)
    hidden = runner.step(cache, [], [], [Prefill(first, [0])])
    token = int(model.lm_head(hidden[0]).argmax())
    before = [t.clone() for t in cache.keys]
    decode = ([token], [len(first)])
    alone = runner.step(cache, *decode, [Prefill(second, [1])])
    cache.keys = [t.clone() for t in before]
    mixed = runner.step(cache, *decode, [Prefill(pooled, [], mean=True), Prefill(second, [1]),
                                         Prefill(plain, []), Prefill(first, [], mean=True)])
    assert mixed.shape[0] == 1 + 4 + 2
    torch.testing.assert_close(mixed[[0, 2]], alone, atol=1e-5, rtol=1e-5)  # decode row and generating prompt
    for row, ids in ((1, pooled), (3, plain), (4, first)):
        torch.testing.assert_close(mixed[row], hf_final(model, ids)[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[5], hf_final(model, pooled).mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[6], hf_final(model, first).mean(0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(mixed[5], mixed[1], atol=1e-3)  # the mean is not the last row
    torch.testing.assert_close(cache.keys[0][0, :, : len(first)], before[0][0, :, : len(first)])  # slot 0 intact


def test_a_prefill_can_ask_for_its_mean_final_hidden_state(model: Any) -> None:
    assert_pools_like_hf(model)


def test_the_gpt2_runner_pools_like_hf_too(lively_base_dir: Any) -> None:
    from transformers import AutoModelForCausalLM

    assert_pools_like_hf(AutoModelForCausalLM.from_pretrained(lively_base_dir).eval().requires_grad_(False))
