"""The peer (vLLM) comparison's pure pieces: skips and their notes, the PEFT adapters, the request bodies.

No vLLM is needed: a fake server (httpx.MockTransport) stands in for it, and this environment's own
python, which has no vllm, is the "interpreter that lacks vllm".
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bench.peer import (
    RATIO_KEYS,
    PeerPlan,
    cpu_ticks,
    foreign_cpu_s,
    peer_notes,
    peer_results,
    peer_workload,
    plan_peer,
)
from bench.peer_vllm import (
    LORA_TARGETS,
    PeerMismatch,
    PeerUnavailable,
    VllmInfo,
    VllmSender,
    VllmServer,
    completion_body,
    make_lora_adapters,
    probe_vllm,
)
from bench.report import render_markdown
from bench.run import assemble, settings_for
from bench.workload import BatchResult, Request, Sample, run_requests

HEADS = ("mix0", "mix1", "mix2", "mix3")


def _workload(n: int = 10, sequential: int = 5) -> dict[str, tuple[list[Request], int]]:
    return peer_workload([f"prompt {i}" for i in range(n)], HEADS, 32, sequential)


def _tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=48, tie_word_embeddings=True,
                         max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_peer_workload_is_base_only_and_round_robin_with_a_sequential_prefix() -> None:
    work = _workload()
    base, c = work["base_c32"]
    assert c == 32 and len(base) == 10 and {r.head for r in base} == {None}
    mixed, _ = work["adapters_c32"]
    assert [r.head for r in mixed[:5]] == [*HEADS, None] and [r.prompt for r in mixed] == [r.prompt for r in base]
    assert work["base_c1"] == (base[:5], 1) and work["adapters_c1"] == (mixed[:5], 1)


def test_without_an_interpreter_the_peer_is_skipped_with_a_note(tmp_path: Path) -> None:
    plan = plan_peer(_workload(), {}, _tiny_llama(tmp_path / "base"), None, tmp_path / "lora")
    assert plan.skipped is not None and "--peer-vllm" in plan.skipped and plan.scenarios == ()
    errors: dict[str, str] = {}
    ratios, detail = peer_results(plan, {}, {}, {}, 8, errors)
    assert detail == {"skipped": plan.skipped} and not errors
    results = assemble(settings_for(True, "cpu", "float32"), {}, None, {}, errors, {"peer_vllm": detail}, ratios,
                       peer_notes(plan, "float32"))
    assert all(math.isnan(results[key]) for key in RATIO_KEYS.values())
    md = render_markdown(results)
    assert f"Peer comparison (vLLM): {plan.skipped}" in md and "| `vs_vllm_base_ratio` | n/a | >= 1 |" in md


@pytest.mark.parametrize("python", [sys.executable, "/nonexistent/bin/python"])
def test_an_interpreter_without_vllm_is_skipped_with_the_reason(python: str) -> None:
    with pytest.raises(PeerUnavailable) as caught:
        probe_vllm(python, "LlamaForCausalLM")
    reason = str(caught.value)
    assert python in reason and "skipped" in reason
    if python == sys.executable:  # this environment has no vllm: the import error is the reason
        assert "vllm" in reason and "No module named" in reason


def test_lora_adapters_are_rank_8_on_q_k_v_o_and_change_the_output(tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_dir = _tiny_llama(tmp_path / "base")
    folders = make_lora_adapters(base_dir, tmp_path / "lora", ["a", "b"])
    assert list(folders) == ["a", "b"]
    weights = {}
    for name, folder in folders.items():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["peft_type"] == "LORA"
        assert set(config["target_modules"]) == set(LORA_TARGETS)
        assert Path(config["base_model_name_or_path"]) == base_dir  # vLLM and PEFT find the base from this
        weights[name] = load_file(folder / "adapter_model.safetensors")
        b_mats = [t for k, t in weights[name].items() if "lora_B" in k]
        assert len(b_mats) == 2 * len(LORA_TARGETS) and all(t.abs().sum() > 0 for t in b_mats)  # 2 layers
        assert {k.split(".")[-3] for k in weights[name]} == set(LORA_TARGETS)
    assert any(not torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])  # two different adapters
    ids = torch.tensor([[1, 5, 9, 3]])
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(folders["a"])).eval()(ids).logits
    assert not torch.allclose(plain, adapted)


def test_completion_body_asks_for_exactly_n_greedy_tokens_from_the_given_ids() -> None:
    body = completion_body("mix1", (5, 6, 7), 64)
    assert body == {"model": "mix1", "prompt": [5, 6, 7], "max_tokens": 64, "min_tokens": 64, "ignore_eos": True,
                    "temperature": 0.0, "stream": False}


def _fake_vllm(seen: list[dict[str, Any]], prompt_tokens_offset: int = 0) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        body = json.loads(request.content)
        seen.append(body)
        usage = {"prompt_tokens": len(body["prompt"]) + prompt_tokens_offset,
                 "completion_tokens": body["max_tokens"] if body["ignore_eos"] else 1}
        return httpx.Response(200, json={"choices": [{"text": "x", "finish_reason": "length"}], "usage": usage})
    return httpx.MockTransport(handler)


def test_vllm_sender_sends_the_prompt_ids_to_the_head_adapter_and_counts_usage_tokens() -> None:
    seen: list[dict[str, Any]] = []
    work = _workload(n=5)
    ids = {r.prompt: [i + 1] * (i + 2) for i, r in enumerate(work["base_c32"][0])}

    async def go() -> BatchResult:
        async with httpx.AsyncClient(transport=_fake_vllm(seen), base_url="http://vllm") as client:
            return await run_requests(VllmSender(client, ids, 16), work["adapters_c32"][0], 3)

    batch = asyncio.run(go())
    expected = {tuple(ids[r.prompt]): r.head or "base" for r in work["adapters_c32"][0]}  # base's own head: "base"
    assert sorted(tuple(b["prompt"]) for b in seen) == sorted(expected)
    assert all(b["model"] == expected[tuple(b["prompt"])] for b in seen)
    assert all(b["ignore_eos"] and b["min_tokens"] == b["max_tokens"] == 16 for b in seen)
    assert batch.tokens == 5 * 16 and [s.head for s in batch.samples] == [*HEADS, None]


def test_vllm_sender_refuses_a_different_prompt_token_count() -> None:
    async def go() -> Sample:
        async with httpx.AsyncClient(transport=_fake_vllm([], prompt_tokens_offset=1), base_url="http://v") as c:
            return await VllmSender(c, {"p": [1, 2]}, 4)(Request("p", None))

    with pytest.raises(PeerMismatch):
        asyncio.run(go())


def _batch(tokens: list[int], wall_s: float) -> BatchResult:
    return BatchResult([Sample(head=None, tokens=t, finish_reason="length", latency_s=1.0, queue_s=0.0,
                               first_token_s=None, total_s=1.0) for t in tokens], wall_s=wall_s)


def test_ratios_are_ours_over_vllm_and_short_requests_are_errors() -> None:
    plan = PeerPlan(workload=_workload(), prompt_ids={},
                    info=VllmInfo(python="py", version="0.32.0", architecture="GPT2LMHeadModel", lora_supported=False),
                    adapters_skipped="no LoRA on GPT2LMHeadModel")
    assert plan.scenarios == ("base_c32", "base_c1")
    ours = {"base_c32": _batch([8, 8], 1.0), "base_c1": _batch([8], 1.0)}
    vllm = {"base_c32": _batch([8, 8], 2.0), "base_c1": _batch([8], 0.5)}
    errors: dict[str, str] = {}
    ratios, detail = peer_results(plan, ours, vllm, {"base": {"flags": ["--dtype", "float32"]}}, 8, errors)
    assert ratios["vs_vllm_base_ratio"] == 2.0 and ratios["vs_vllm_base_ratio_sequential"] == 0.5
    assert math.isnan(ratios["vs_vllm_adapters_ratio"]) and not errors
    assert detail["tokens_per_s"]["vllm"]["base_c32"] == 8.0 and detail["vllm_version"] == "0.32.0"
    results = assemble(settings_for(True, "cpu", "float32"), {}, None, {}, errors, {"peer_vllm": detail}, ratios,
                       peer_notes(plan, "float32"))
    md = render_markdown(results)
    assert "| `vs_vllm_base_ratio` | 2 ✅ | >= 1 |" in md and "| `vs_vllm_base_ratio_sequential` | 0.5 ❌ |" in md
    assert "| base, 32 concurrent | 16 | 8 | 2 |" in md and "no LoRA on GPT2LMHeadModel" in md
    peer_results(plan, ours, {**vllm, "base_c1": _batch([7], 0.5)}, {}, 8, errors)
    assert "peer_token_counts_vllm" in errors and "peer_token_counts_ours" not in errors


def test_vllm_server_flags_and_a_failed_start_reports_the_log_tail(tmp_path: Path) -> None:
    adapters = {"mix0": tmp_path / "a0", "mix1": tmp_path / "a1"}
    server = VllmServer(sys.executable, tmp_path / "base", tmp_path / "vllm.log", adapters=adapters)
    flags = server.record()["flags"]
    assert flags[flags.index("--max-lora-rank") + 1] == "8" and flags[flags.index("--max-loras") + 1] == "2"
    assert f"mix0={tmp_path / 'a0'}" in flags and "--enable-lora" in flags
    assert "--enable-lora" not in VllmServer(sys.executable, tmp_path, tmp_path / "x.log").flags
    with pytest.raises(RuntimeError) as caught, server:  # this python has no vllm: it exits at once
        pass
    assert "exited" in str(caught.value) and "No module named" in str(caught.value)
    assert server.proc is None  # stopped on the way out


def test_foreign_cpu_counts_only_processes_outside_the_bench_tree() -> None:
    import os

    tick = os.sysconf("SC_CLK_TCK")
    # pid 10 is the bench, 11 its server, 12 the server's worker; 20 is someone else's test run, 21 started later.
    before = {10: (1, 0), 11: (10, 0), 12: (11, 0), 20: (1, 5 * tick)}
    after = {10: (1, tick), 11: (10, 9 * tick), 12: (11, 9 * tick), 20: (1, 8 * tick), 21: (1, 2 * tick)}
    assert foreign_cpu_s(before, after, root=10) == pytest.approx(3 + 2)
    assert foreign_cpu_s(before, after, root=11) == pytest.approx(1 + 3 + 2)  # the bench itself is outside 11
    ticks = cpu_ticks()
    assert os.getpid() in ticks and ticks[os.getpid()][0] == os.getppid()
