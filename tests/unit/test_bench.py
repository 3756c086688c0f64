"""The benchmark's pure pieces: statistics, rendering, the tokenizer builder, the resident-bytes counter.

Nothing here starts a server or builds the 124M base, and nothing asserts on timings.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bench import fixtures
from bench.report import REQUIRED_KEYS, clean_for_json, fmt_value, render_markdown
from bench.run import assemble, settings_for
from bench.stats import decode_rate, median, percentile, ratio
from bench.workload import (
    BatchResult,
    Request,
    Sample,
    make_prompts,
    metric_delta,
    metric_sums,
    mixed_requests,
    run_batch,
)
from clients import GenerateResult, Timings
from heads import BackwardAttentionConfig, BackwardAttentionHead, LinearHead


def test_percentile_interpolates_between_closest_ranks() -> None:
    data = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 5.0
    assert percentile(data, 50) == median(data) == 3.0
    assert percentile(data, 25) == 2.0
    assert percentile(data, 99) == pytest.approx(4.96)
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(data, 101)


def test_ratio_and_decode_rate_do_not_raise_on_degenerate_input() -> None:
    assert ratio(6.0, 3.0) == 2.0
    assert math.isnan(ratio(1.0, 0.0))
    assert decode_rate(11, 0.5, 1.5) == pytest.approx(10.0)  # first token excluded from the rate
    assert math.isnan(decode_rate(1, 0.5, 1.0))
    assert math.isnan(decode_rate(5, None, 1.0))


def _results() -> dict[str, Any]:
    return {
        "date": "2026-01-01T00:00:00+00:00", "quick": True, "device": "cpu", "dtype": "float32",
        "torch_version": "2.x", "torch_num_threads": 2, "machine": {"cpu_model": "Test CPU", "cpu_count": 2},
        "settings": {"requests": 32, "max_new_tokens": 8},
        "head_vs_linear_decode_ratio": 0.95, "concurrency_speedup": 2.5, "vs_hf_generate_speedup": float("nan"),
        "p50_latency_s": {"1": 0.1, "8": 0.5, "32": 2.0}, "p99_latency_s": {"1": 0.2, "8": 0.6, "32": 2.5},
        "ttft_p50_s": {"1": 0.01, "8": 0.05, "32": 0.3}, "head_cold_load_s": 0.4, "head_warm_first_token_s": 0.04,
        "many_heads_throughput_ratio": 0.05, "bytes_per_resident_head": 13_311_236, "bytes_per_head_on_disk": 249_284,
        "details": {"hf_generate": {"tokens_per_s": 50.0}}, "notes": ["HF uses the linear head"],
        "errors": {"hf_generate": "RuntimeError: boom"},
    }


def test_markdown_has_one_row_per_metric_with_goals_and_context() -> None:
    md = render_markdown(_results())
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(REQUIRED_KEYS)
    assert "| `head_vs_linear_decode_ratio` | 0.95 ✅ | >= 0.9 |" in md
    assert "| `concurrency_speedup` | 2.5 ❌ | >= 5 |" in md
    assert "| `vs_hf_generate_speedup` | n/a |" in md  # NaN renders, never crashes
    assert "c=1: 0.1 · c=8: 0.5 · c=32: 2" in md
    assert "13,311,236 B (12.7 MiB)" in md
    assert "Test CPU" in md and "HF uses the linear head" in md and "RuntimeError: boom" in md


def test_json_cleaning_makes_strict_json() -> None:
    cleaned = clean_for_json({"a": float("nan"), "b": [float("inf"), 1.23456789], "c": {1: 2}})
    assert cleaned == {"a": None, "b": [None, 1.234568], "c": {"1": 2}}
    json.dumps(cleaned, allow_nan=False)
    assert fmt_value(0.0001234) == "1.23e-04" and fmt_value(1234) == "1,234" and fmt_value(None) == "n/a"


def test_assemble_with_nothing_measured_still_has_every_key() -> None:
    results = assemble(settings_for(True, "cpu", "float32"), {}, None, {}, {"server": "failed"}, {})
    assert all(key in results for key in REQUIRED_KEYS)
    assert set(results["p50_latency_s"]) == {"1", "8", "32"}
    json.dumps(clean_for_json(results), allow_nan=False)
    render_markdown(results)


def test_tokenizer_builder_small_vocab_round_trips_and_decodes_every_id(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = fixtures.build_tokenizer(vocab_size=300)
    assert len(tok) == 300 and tok.eos_token_id == 299 and tok.eos_token == fixtures.EOS_TOKEN
    text = "The farmer sold 12 apples, then 7 more! What is left?\nAnswer: 5."
    ids = tok(text)["input_ids"]
    assert max(ids) < 300 and tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # the merges apply: common letter pairs become one token
    tok.decode(list(range(300)))
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)  # offline: a local folder only
    assert len(loaded) == 300 and loaded.decode(loaded(text)["input_ids"]) == text
    with pytest.raises(ValueError):
        fixtures.build_tokenizer(vocab_size=100)


def test_byte_symbols_are_256_distinct_single_characters() -> None:
    symbols = fixtures.byte_symbols()
    assert len(set(symbols)) == 256 and all(len(s) == 1 for s in symbols)
    assert symbols[ord("a")] == "a" and symbols[ord(" ")] == "Ġ"


def _tensor_bytes(module: nn.Module) -> int:
    return sum(p.nbytes for p in module.parameters())


def test_resident_bytes_count_head_and_prepare_caches_but_not_shared_embeddings() -> None:
    vocab, width = 50, 16
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, num_heads=2), vocab_size=vocab, n_embd=width)
    params = _tensor_bytes(head)
    embeddings = nn.Parameter(torch.randn(vocab, width), requires_grad=False)  # as the base's wte is
    head.prepare(embeddings)
    inner = 8  # num_heads * head_dim
    expected = params + vocab * inner * 4 + width * inner * 4  # + _key_cache (V, H*d) + _fold (D, H*d)
    sizes = fixtures.resident_head_tensors(head, embeddings)
    assert "_key_cache" in sizes and "_fold" in sizes and "_embeddings" not in sizes
    assert fixtures.resident_head_bytes(head, embeddings) == expected
    # Without naming the shared matrix, the embeddings the head references would be counted too.
    assert fixtures.resident_head_bytes(head) == expected + vocab * width * 4


def test_resident_bytes_of_a_linear_head_are_its_weights() -> None:
    head = LinearHead(vocab_size=50, n_embd=16)
    head.prepare(torch.randn(50, 16))
    assert fixtures.resident_head_bytes(head) == 50 * 16 * 4


def test_make_head_has_math_shape_and_a_nonzero_query() -> None:
    head = fixtures.make_head(vocab_size=64, n_embd=32)
    assert head.config.latent_dim == 64 and head.config.num_heads == 2 and head.config.residual
    assert head.query.weight.abs().sum() > 0


def test_prompts_have_token_counts_in_range_and_are_deterministic() -> None:
    count = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer: one token per word
    prompts = make_prompts(20, count, lo=8, hi=40)
    assert prompts == make_prompts(20, count, lo=8, hi=40)
    assert all(8 <= count(p) <= 40 for p in prompts)
    assert len({count(p) for p in prompts}) > 5
    reqs = mixed_requests(prompts[:6], ["a", "b", None])
    assert [r.head for r in reqs] == ["a", "b", None, "a", "b", None]


class _FakeClient:
    """Stands in for AsyncHeadserveClient and records the most requests in flight at once."""

    def __init__(self) -> None:
        self.in_flight = self.peak = 0

    async def generate(self, prompt: str, head: str | None = None, **kwargs: Any) -> GenerateResult:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        n = kwargs["max_new_tokens"]
        assert kwargs["raw"] and kwargs["ignore_eos"]
        return GenerateResult(text="x", tokens=n - 1 if head is None else n, finish_reason="length", head=head,
                              prompt=prompt, timings=Timings(queue_s=0.0, first_token_s=0.1, total_s=0.5,
                                                             tokens_per_s=1.0))


@pytest.mark.parametrize("concurrency", [1, 3])
def test_run_batch_caps_concurrency_and_counts_returned_tokens(concurrency: int) -> None:
    client = _FakeClient()
    reqs = [Request(f"p{i}", None if i % 2 else "h") for i in range(8)]
    batch = asyncio.run(run_batch(client, reqs, concurrency, 4))  # type: ignore[arg-type]
    assert client.peak == concurrency
    assert isinstance(batch, BatchResult) and len(batch.samples) == 8
    assert batch.tokens == 4 * 4 + 4 * 3  # what came back, not 8 * max_new_tokens
    summary = batch.summary(4)
    assert summary["short_requests"] == 4 and summary["requests"] == 8
    assert isinstance(batch.samples[0], Sample) and batch.samples[0].first_token_s == 0.1


def test_metric_sums_add_over_labels_and_deltas_give_mean_batch() -> None:
    before_text = "# HELP x\nheadserve_head_loads_total{head=\"a\"} 1.0\nheadserve_batch_size_count 2.0\n"
    after_text = ("headserve_head_loads_total{head=\"a\"} 2.0\nheadserve_head_loads_total{head=\"b\"} 3.0\n"
                  "headserve_batch_size_sum 40.0\nheadserve_batch_size_count 6.0\nother_metric 9.0\n")
    before, after = metric_sums(before_text), metric_sums(after_text)
    assert after == {"headserve_head_loads_total": 5.0, "headserve_batch_size_sum": 40.0,
                     "headserve_batch_size_count": 6.0}
    delta = metric_delta(before, after)
    assert delta["head_loads_total"] == 4.0 and delta["batch_size_count"] == 4.0
    assert delta["mean_batch_size"] == 10.0


def test_smollm2_shaped_spec_is_smollm2_135m_and_a_tiny_one_builds_once(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    spec = fixtures.smollm2_spec()
    assert {k: spec[k] for k in ("vocab_size", "hidden_size", "n_layer", "num_attention_heads",
                                 "num_key_value_heads", "intermediate_size", "rope_theta", "tie_word_embeddings")} \
        == {"vocab_size": 49152, "hidden_size": 576, "n_layer": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "intermediate_size": 1536, "rope_theta": 100000.0, "tie_word_embeddings": True}
    assert fixtures.smollm2_dir_for(cache_dir=tmp_path) != fixtures.base_dir_for(cache_dir=tmp_path)
    tiny = {**spec, "vocab_size": 300, "hidden_size": 36, "n_layer": 2, "intermediate_size": 48}
    built: list[str] = []
    folder = fixtures.ensure_smollm2_base(cache_dir=tmp_path, log=built.append, spec=tiny, folder=tmp_path / "tiny")
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.vocab_size == 300 and config.num_hidden_layers == 2
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 4)
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.tie_word_embeddings
    assert len(AutoTokenizer.from_pretrained(folder)) == 300
    assert fixtures.ensure_smollm2_base(cache_dir=tmp_path, log=built.append, spec=tiny, folder=folder) == folder
    assert len(built) == 1  # cached: the second call found the marker and built nothing
    other = {**tiny, "n_layer": 3}
    fixtures.ensure_smollm2_base(cache_dir=tmp_path, log=built.append, spec=other, folder=folder)
    assert len(built) == 2 and AutoConfig.from_pretrained(folder).num_hidden_layers == 3  # a new spec rebuilds


def test_settings_pick_the_shaped_base_layers_and_the_peer_keys_are_reported() -> None:
    assert settings_for(False, "cpu", "float32").n_layer == 12
    smol = settings_for(False, "cpu", "float32", base="smollm2-shaped")
    assert smol.n_layer == 30 and smol.base == "smollm2-shaped" and smol.peer_sequential_requests == 10
    assert settings_for(True, "cpu", "float32", 4, "smollm2-shaped").n_layer == 4
    for key in ("vs_vllm_base_ratio", "vs_vllm_adapters_ratio", "vs_vllm_base_ratio_sequential",
                "vs_vllm_adapters_ratio_sequential"):
        assert key in REQUIRED_KEYS
    results = assemble(smol, {}, None, {}, {}, {}, {"vs_vllm_adapters_ratio": 1.6})
    assert results["vs_vllm_adapters_ratio"] == 1.6 and math.isnan(results["vs_vllm_base_ratio"])
    assert "SmolLM2-135M shape" in results["notes"][0] and results["base"] == "smollm2-shaped"
    assert "| `vs_vllm_adapters_ratio` | 1.6 ✅ | >= 1.5 |" in render_markdown(results)
