"""The peer comparison: the same requests through our server and through vLLM, one server after the other.

Why one after the other, never side by side: on a small machine two servers would share the cores and
each would measure the other. Why two vLLM servers: a user serving the base alone would not enable
LoRA (which, on a CPU, also turns vLLM's compiled graphs off), so the base is measured on a plain
vLLM and the adapters on one started with them. Ours serves both from one process, as it would.

The workload: 32 requests at 32 concurrent, and a shorter run one at a time (batch 1), each on the
base's own head alone and round-robin over the base and 4 fine-tunes (heads on ours, rank-8 LoRA
adapters on vLLM); every request makes exactly max_new_tokens greedy tokens on both sides.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.peer_vllm import (
    LORA_RANK,
    LORA_TARGETS,
    PeerUnavailable,
    VllmInfo,
    VllmSender,
    VllmServer,
    make_lora_adapters,
    probe_vllm,
)
from bench.stats import ratio
from bench.workload import BatchResult, Request, mixed_requests, run_batch, run_requests
from clients import AsyncHeadserveClient

# Scenario -> the results key of ours / vLLM for it.
RATIO_KEYS = {"base_c32": "vs_vllm_base_ratio", "adapters_c32": "vs_vllm_adapters_ratio",
              "base_c1": "vs_vllm_base_ratio_sequential", "adapters_c1": "vs_vllm_adapters_ratio_sequential"}
BASE_SCENARIOS = ("base_c32", "base_c1")
ADAPTER_SCENARIOS = ("adapters_c32", "adapters_c1")
WARMUP_TOKENS = 2


@dataclass
class PeerPlan:
    """What the peer run will do, decided before either server starts (skips included, with their reasons)."""

    workload: dict[str, tuple[list[Request], int]]  # scenario -> (requests, concurrency)
    prompt_ids: dict[str, list[int]]  # the tokens our server makes of each prompt: vLLM gets exactly these
    info: VllmInfo | None = None
    skipped: str | None = None  # the whole comparison
    adapters: dict[str, Path] = field(default_factory=dict)
    adapters_skipped: str | None = None
    foreign_cpu_s: dict[str, float] = field(default_factory=dict)  # other processes' CPU while a side ran

    @property
    def scenarios(self) -> tuple[str, ...]:
        """What both sides run: nothing when skipped, the base alone when vLLM cannot take the adapters."""
        if self.skipped is not None:
            return ()
        return BASE_SCENARIOS + (ADAPTER_SCENARIOS if self.adapters else ())


def plan_peer(workload: dict[str, tuple[list[Request], int]], prompt_ids: dict[str, list[int]], base_dir: Path,
              python: str | None, adapters_dir: Path) -> PeerPlan:
    """Probe the vLLM interpreter and make its adapters before our server starts; a skip carries its reason."""
    plan = PeerPlan(workload=workload, prompt_ids=prompt_ids)
    architecture = (json.loads((base_dir / "config.json").read_text()).get("architectures") or ["?"])[0]
    try:
        plan.info = probe_vllm(python, architecture)
    except PeerUnavailable as e:
        plan.skipped = str(e)
        return plan
    if not plan.info.lora_supported:
        plan.adapters_skipped = (f"vLLM {plan.info.version} serves no LoRA adapters on {architecture}: the "
                                 "vs_vllm_adapters_* ratios are not measured on this base.")
        return plan
    # One adapter per head of the mix, under the head's name: request i asks vLLM for what it asks ours.
    names = list(dict.fromkeys(r.head for r in workload["adapters_c32"][0] if r.head is not None))
    try:
        plan.adapters = make_lora_adapters(base_dir, adapters_dir, names)
    except Exception as e:  # noqa: BLE001 - the base comparison still runs
        plan.adapters_skipped = f"PEFT could not make the LoRA adapters ({type(e).__name__}: {e})."
    gc.collect()
    return plan


def peer_workload(prompts: Sequence[str], heads: Sequence[str], concurrency: int,
                  sequential: int) -> dict[str, tuple[list[Request], int]]:
    """Base-only and mixed (round-robin over the heads, then the base) requests, concurrent and one at a time."""
    base = [Request(p, None) for p in prompts]
    mixed = mixed_requests(prompts, [*heads, None])
    return {"base_c32": (base, concurrency), "adapters_c32": (mixed, concurrency),
            "base_c1": (base[:sequential], 1), "adapters_c1": (mixed[:sequential], 1)}


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """Every process's (parent pid, user + system clock ticks so far), from /proc (empty where there is none)."""
    ticks: dict[int, tuple[int, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            ticks[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return ticks


def foreign_cpu_s(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], root: int) -> float:
    """CPU seconds spent between two `cpu_ticks` snapshots by processes outside `root`'s tree.

    Why: the two sides are measured minutes apart, so anything else running on the machine (another
    benchmark, a test suite) slows one side and not the other; this says how much of it there was.
    Processes that ended in between are missed, so it is a lower bound.
    """
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in after.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = set(), [root]
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo += children.get(pid, [])
    ticks = sum(t - before.get(pid, (0, 0))[1] for pid, (_, t) in after.items() if pid not in ours)
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def witness(plan: PeerPlan, label: str) -> Iterator[None]:
    """Record in `plan.foreign_cpu_s` how much CPU other processes took while `label` was measured."""
    if not Path("/proc/self/stat").is_file():
        yield
        return
    before = cpu_ticks()
    yield
    plan.foreign_cpu_s[label] = foreign_cpu_s(before, cpu_ticks(), os.getpid())


async def run_ours(client: AsyncHeadserveClient, plan: PeerPlan, max_new_tokens: int) -> dict[str, BatchResult]:
    """Our side, on a server the caller has warmed up (every head used, its keys materialised)."""
    out: dict[str, BatchResult] = {}
    with witness(plan, "ours"):
        for name in plan.scenarios:
            requests, concurrency = plan.workload[name]
            out[name] = await run_batch(client, requests, concurrency, max_new_tokens)
    return out


async def _vllm_batches(url: str, plan: PeerPlan, names: Sequence[str], models: Sequence[str | None],
                        max_new_tokens: int) -> dict[str, BatchResult]:
    """Warm every model up as ours was (twice each, a few tokens), then run the named scenarios."""
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as client:
        sender = VllmSender(client, plan.prompt_ids, max_new_tokens)
        first = next(iter(plan.prompt_ids))
        for _ in range(2):
            for model in models:
                await sender.send(Request(first, model), plan.prompt_ids[first], WARMUP_TOKENS)
        out: dict[str, BatchResult] = {}
        with witness(plan, "vllm_lora" if any(model is not None for model in models) else "vllm_base"):
            for name in names:
                requests, concurrency = plan.workload[name]
                out[name] = await run_requests(sender, requests, concurrency)
    return out


def run_vllm(plan: PeerPlan, base_dir: Path, dtype: str, max_new_tokens: int, log_dir: Path, stamp: str,
             errors: dict[str, str], log: Any) -> tuple[dict[str, BatchResult], dict[str, Any]]:
    """vLLM's side: a plain server for the base scenarios, then one with the adapters for the mixed ones."""
    batches: dict[str, BatchResult] = {}
    servers: dict[str, Any] = {}
    assert plan.info is not None
    runs: list[tuple[str, dict[str, Path], tuple[str, ...], list[str | None]]] = [
        ("base", {}, BASE_SCENARIOS, [None])]
    if plan.adapters:
        runs.append(("lora", plan.adapters, ADAPTER_SCENARIOS, [*plan.adapters, None]))
    for label, adapters, names, models in runs:
        log_path = log_dir / f"vllm-{label}-{stamp}.log"
        log(f"starting vLLM ({label}; log: {log_path})")
        server = VllmServer(plan.info.python, base_dir, log_path, dtype=dtype, adapters=adapters)
        try:
            with server:
                log(f"vLLM ({label}) ready after {server.ready_after_s:.1f}s")
                batches.update(asyncio.run(_vllm_batches(server.url, plan, names, models, max_new_tokens)))
        except Exception as e:  # noqa: BLE001 - recorded; the rest of the results still get written
            errors[f"vllm_{label}"] = f"{type(e).__name__}: {e}"
            log(f"vLLM ({label}) failed: {errors[f'vllm_{label}']}")
        servers[label] = server.record()
    return batches, servers


def _tps(batches: Mapping[str, BatchResult], name: str) -> float:
    batch = batches.get(name)
    return batch.tokens_per_s if batch is not None else math.nan


def peer_results(plan: PeerPlan, ours: Mapping[str, BatchResult], vllm: Mapping[str, BatchResult],
                 servers: Mapping[str, Any], max_new_tokens: int,
                 errors: dict[str, str]) -> tuple[dict[str, float], dict[str, Any]]:
    """The four ratio keys (NaN where not measured) and the numbers behind them for `details`."""
    ratios = {key: ratio(_tps(ours, name), _tps(vllm, name)) for name, key in RATIO_KEYS.items()}
    if plan.skipped is not None:
        return ratios, {"skipped": plan.skipped}
    info = plan.info
    detail: dict[str, Any] = {
        "vllm_version": info.version if info else None, "vllm_python": info.python if info else None,
        "tokens_per_s": {"ours": {name: _tps(ours, name) for name in RATIO_KEYS},
                         "vllm": {name: _tps(vllm, name) for name in RATIO_KEYS}},
        "requests": {name: len(reqs) for name, (reqs, _) in plan.workload.items()},
        "servers": dict(servers),
        "other_processes_cpu_s": dict(plan.foreign_cpu_s),
        "adapters": {"rank": LORA_RANK, "target_modules": list(LORA_TARGETS), "names": list(plan.adapters)},
        "ours": {name: b.summary(max_new_tokens) for name, b in ours.items()},
        "vllm": {name: b.summary(max_new_tokens) for name, b in vllm.items()},
    }
    if plan.adapters_skipped:
        detail["adapters_skipped"] = plan.adapters_skipped
    for side, batches in (("ours", ours), ("vllm", vllm)):
        off = {name: [s.tokens for s in b.samples if s.tokens != max_new_tokens] for name, b in batches.items()}
        off = {name: counts for name, counts in off.items() if counts}
        if off:  # the two sides did different work: the ratios would not mean what they say
            errors[f"peer_token_counts_{side}"] = f"requests that did not make exactly {max_new_tokens} tokens: {off}"
    return ratios, detail


def peer_notes(plan: PeerPlan, dtype: str) -> list[str]:
    """How to read the vs_vllm_* ratios."""
    if plan.skipped is not None:
        return [f"Peer (vLLM): {plan.skipped}."]
    notes = [f"Peer (vLLM {plan.info.version if plan.info else '?'}): the same prompts (as the token ids our "
             f"server makes of them), greedy, exactly max_new_tokens tokens each (`ignore_eos`, `min_tokens`), "
             f"{dtype} on both; vLLM ran after our server stopped, with its CPU defaults (its log, under `servers`, "
             "shows the cores it bound: on 2 cores, one to the model and one to its front end). The base "
             "scenarios use a plain vLLM; the mixed ones a vLLM with "
             f"4 PEFT LoRA adapters (rank {LORA_RANK} on {'/'.join(LORA_TARGETS)}) against our 4 heads."]
    if plan.adapters_skipped:
        notes.append(f"Peer adapters: {plan.adapters_skipped}")
    return notes
