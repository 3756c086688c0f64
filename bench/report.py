"""What the benchmark writes: machine facts, the JSON document and its markdown table.

Why the rendering is a pure function of the results dict: the table can be re-rendered (or
tested) from a saved JSON without re-running anything.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# (key, goal shown in the table, what the row means). The order is the table's order.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("head_vs_linear_decode_ratio", ">= 0.9", "decode tok/s with a math-shaped head / with the base's linear head, "
                                              "batch 1"),
    ("concurrency_speedup", ">= 5", "tok/s of 32 concurrent mixed requests / the same 32 one at a time"),
    ("vs_hf_generate_speedup", "", "tok/s of the 32 requests through the server concurrently / a loop over HF "
                                   "`model.generate` (linear head only: HF cannot apply our heads)"),
    ("p50_latency_s", "", "client wall time per request, by concurrency"),
    ("p99_latency_s", "", "client wall time per request, by concurrency"),
    ("ttft_p50_s", "", "server `timings.first_token_s` (accepted -> first token), by concurrency"),
    ("head_cold_load_s", "", "head copied into the registry -> first token (client wall, max_new_tokens=1)"),
    ("head_warm_first_token_s", "", "the same for a resident head, for context"),
    ("many_heads_throughput_ratio", ">= 0.9", "tok/s with requests cycling over 100 heads (cache of 8) / all on "
                                              "one head"),
    ("bytes_per_resident_head", "", "tensor bytes a prepared head keeps (params, buffers, prepare caches; not the "
                                    "shared embeddings)"),
    ("bytes_per_factored_head", "", "the same for a head served in factored form (params + two D x H*d "
                                    "matrices): its first uses, and the long tail"),
    ("bytes_per_head_on_disk", "", "size of head.safetensors"),
    ("vs_vllm_base_ratio", ">= 1", "our tok/s / vLLM's, 32 concurrent requests on the base alone (--peer-vllm)"),
    ("vs_vllm_adapters_ratio", ">= 1.5", "our tok/s with 4 heads + base / vLLM's with 4 rank-8 LoRA adapters + "
                                         "base, round-robin, 32 concurrent"),
    ("vs_vllm_base_ratio_sequential", ">= 1", "the same on the base, one request at a time"),
    ("vs_vllm_adapters_ratio_sequential", ">= 1.5", "the same with heads / adapters, one request at a time"),
)
REQUIRED_KEYS = tuple(key for key, _, _ in METRICS)
GOALS = {"head_vs_linear_decode_ratio": 0.9, "concurrency_speedup": 5.0, "many_heads_throughput_ratio": 0.9,
         "vs_vllm_base_ratio": 1.0, "vs_vllm_adapters_ratio": 1.5, "vs_vllm_base_ratio_sequential": 1.0,
         "vs_vllm_adapters_ratio_sequential": 1.5}
# The peer scenarios' rows: (scenario key in details.peer_vllm.tokens_per_s, label).
PEER_ROWS = (("base_c32", "base, 32 concurrent"), ("adapters_c32", "4 heads / 4 LoRA adapters + base, 32 concurrent"),
             ("base_c1", "base, one at a time"), ("adapters_c1", "4 heads / 4 LoRA adapters + base, one at a time"))


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, falling back to platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Where the numbers were taken: timings mean little without it."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "cpus_usable": usable, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def clean_for_json(value: Any) -> Any:
    """NaN/inf become null (strict JSON has no NaN), floats rounded to keep the file readable."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 6)
    if isinstance(value, Mapping):
        return {str(k): clean_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_for_json(v) for v in value]
    return value


def write_json(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean_for_json(results), indent=2) + "\n")


def fmt_value(value: Any) -> str:
    """A table cell: 3 significant digits for floats, thousands separators for ints, 'c=N: x' for dicts."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    if isinstance(value, Mapping):
        return " · ".join(f"c={k}: {fmt_value(v)}" for k, v in value.items())
    return str(value)


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return fmt_value(n)
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(n):,} B" if unit == "B" else f"{int(n):,} B ({size:.1f} {unit})"
        size /= 1024
    return str(n)


def _status(key: str, value: Any) -> str:
    goal = GOALS.get(key)
    if goal is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return ""
    return " ✅" if value >= goal else " ❌"


def render_peer(peer: Any) -> list[str]:
    """The peer comparison's raw numbers side by side, or why it was skipped (nothing when absent)."""
    if not isinstance(peer, Mapping):
        return []
    if "skipped" in peer:
        return ["", f"Peer comparison (vLLM): {peer['skipped']}"]
    rates = peer.get("tokens_per_s", {})
    ours, vllm = rates.get("ours", {}), rates.get("vllm", {})
    lines = ["", f"Peer: vLLM {peer.get('vllm_version', '?')}, tokens/s measured in the same run:", "",
             "| workload | headserve tok/s | vLLM tok/s | ratio |", "|---|---:|---:|---:|"]
    for key, label in PEER_ROWS:
        a, b = ours.get(key), vllm.get(key)
        both = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b))
        lines.append(f"| {label} | {fmt_value(a)} | {fmt_value(b)} | {fmt_value(a / b) if both and b else 'n/a'} |")
    if peer.get("adapters_skipped"):
        lines += ["", f"Adapters: {peer['adapters_skipped']}"]
    foreign = peer.get("other_processes_cpu_s")
    if isinstance(foreign, Mapping) and foreign:
        lines += ["", "CPU seconds other processes took while each side was measured (0 is a quiet machine): "
                  + ", ".join(f"{k} {fmt_value(v)}" for k, v in foreign.items())]
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    """The results as a markdown table plus the context needed to read it."""
    machine = results.get("machine", {})
    settings = results.get("settings", {})
    lines = [
        "# headserve benchmark",
        "",
        f"{results.get('date', '?')} · {'quick' if results.get('quick') else 'full'} run · device "
        f"`{results.get('device', '?')}` ({results.get('dtype', '?')}) · torch {results.get('torch_version', '?')} "
        f"({results.get('torch_num_threads', '?')} threads) · {machine.get('cpu_model', '?')}, "
        f"{machine.get('cpu_count', '?')} CPUs · {machine.get('platform', '?')}",
        "",
        "| metric | value | goal | what it measures |",
        "|---|---:|---:|---|",
    ]
    for key, goal, meaning in METRICS:
        value = results.get(key)
        cell = fmt_bytes(value) if key.startswith("bytes_") else fmt_value(value)
        lines.append(f"| `{key}` | {cell}{_status(key, value)} | {goal} | {meaning} |")
    details = results.get("details", {})
    lines += render_peer(details.get("peer_vllm"))
    if details:
        lines += ["", "Supporting numbers:", ""]
        for name, block in details.items():
            if isinstance(block, Mapping):
                body = ", ".join(f"{k} {fmt_value(v)}" for k, v in block.items() if not isinstance(v, (list, dict)))
            else:
                body = fmt_value(block)
            lines.append(f"- `{name}`: {body}")
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k}={fmt_value(v)}" for k, v in settings.items())]
    notes = list(results.get("notes", []))
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    errors = results.get("errors", {})
    if errors:
        lines += ["", "Errors:", ""] + [f"- `{k}`: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"
