"""The research table from scratch: every head kind trained the same way, then evaluated on GSM8K and SVAMP.

    python -m training.research --out runs/research            # `make research`: both bases, hours on 2 cores
    python -m training.research --out /tmp/r --quick           # CI-sized smoke run of the same steps

For each base (SmolLM2-135M-Instruct and the embedded mini GPT-2) it trains four heads on the same
GSM8K training problems with the same seed, batch and epochs (`training.fit`; one base pass, cached,
serves all four): the paper's backward-attention head ("logits" weighting), its "probs" variant, a
full copy of the LM head (`linear`) and a low-rank correction with the backward-attention head's
parameter count (`lowrank`). Then `training.evaluate` scores the base's own greedy and top-k decoding
and every head on GSM8K test (with the temperature x top-k sweep) and on SVAMP (out of distribution:
never trained on). Learning rates are per base and kind, fixed in `PLANS` before any test split was
looked at (SmolLM2's from the held-out loss of its first head in issue 11: 3e-3 diverged, 3e-4 did not).

Each step runs as its own process, so one failing step names itself and frees its memory. A step
whose output exists is skipped (a killed run resumes where it stopped; delete a folder to redo it).
What every step cost goes to `<base>/timings.json`, and `summary.md` gathers the tables of all reports.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heads.base import EMBEDDED_BASE, REPO_ROOT
from heads.folders import write_file_atomic
from training import cli

log = logging.getLogger("training.research")
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"  # ../shared/data beside the checkout (never copied into it)
SMOLLM2 = "smollm2-135m-instruct"
EMBEDDED = "embedded"


@dataclass(frozen=True)
class HeadPlan:
    name: str  # the head folder's name, the report row's name
    args: tuple[str, ...]  # training.fit arguments of this kind


@dataclass(frozen=True)
class BasePlan:
    base: str  # what --base gets
    heads: tuple[HeadPlan, ...]
    fit_args: tuple[str, ...] = ()  # shared by every head of this base
    max_new_tokens: int = 256


def _relative_base(path: Path) -> str:
    return os.path.relpath(path, REPO_ROOT)  # models/mini-gpt2: each step runs in the checkout


def _heads(ba_lr: str, linear_lr: str, lowrank_lr: str) -> tuple[HeadPlan, ...]:
    return (
        HeadPlan("ba-logits", ("--kind", "backward_attention", "--weighting", "logits", "--lr", ba_lr)),
        HeadPlan("ba-probs", ("--kind", "backward_attention", "--weighting", "probs", "--lr", ba_lr)),
        HeadPlan("linear", ("--kind", "linear", "--lr", linear_lr)),
        HeadPlan("lowrank", ("--kind", "lowrank", "--lr", lowrank_lr)),
    )


PLANS: dict[str, BasePlan] = {
    SMOLLM2: BasePlan(SMOLLM2, _heads("3e-4", "1e-4", "1e-3"), ("--max-len", "384")),
    EMBEDDED: BasePlan(_relative_base(EMBEDDED_BASE), _heads("3e-3", "3e-4", "1e-3"), max_new_tokens=128),
}


@dataclass
class Settings:
    out: Path
    bases: list[str]
    data_root: Path
    train_limit: int = 2000
    epochs: int = 2
    gsm8k_limit: int = 500
    svamp_limit: int = 300
    sweep_limit: int = 40
    max_new_tokens: int | None = None  # None: the base plan's
    fit_extra: list[str] = field(default_factory=list)
    quick: bool = False
    stage: str = "all"


def parse_args(argv: list[str] | None) -> Settings:
    p = cli.parser("training.research", __doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for heads, reports, timings.json and summary.md")
    p.add_argument("--bases", nargs="+", choices=sorted(PLANS), default=[SMOLLM2, EMBEDDED], help="which bases")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT, help="folder holding gsm8k/ and svamp/")
    p.add_argument("--train-limit", type=int, default=2000, help="GSM8K training problems (the first N)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every head")
    p.add_argument("--gsm8k-limit", type=int, default=500, help="GSM8K test problems (0: all 1,319)")
    p.add_argument("--svamp-limit", type=int, default=300, help="SVAMP problems (0: all 1,000)")
    p.add_argument("--sweep-limit", type=int, default=40, help="GSM8K test problems of the temperature/top-k sweep")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default: per base)")
    p.add_argument("--stage", choices=("all", "fit", "evaluate"), default="all",
                   help="fit: train the heads only; evaluate: only evaluate heads trained before")
    p.add_argument("--quick", action="store_true", help="smoke run: the embedded base, a few problems, two steps")
    a = p.parse_args(argv)
    settings = Settings(a.out, a.bases, a.data_root, a.train_limit, a.epochs, a.gsm8k_limit, a.svamp_limit,
                        a.sweep_limit, a.max_new_tokens, stage=a.stage)
    if a.quick:
        settings.bases = [EMBEDDED]
        settings.train_limit, settings.epochs, settings.gsm8k_limit, settings.svamp_limit = 40, 1, 6, 6
        settings.sweep_limit, settings.max_new_tokens, settings.quick = 4, 8, True
        settings.fit_extra = ["--max-steps", "2", "--batch-size", "8"]
    return settings


class Steps:
    """Runs each step as a child process once, records its wall time, and skips what an earlier run finished."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / "timings.json"
        self.timings: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, done: Path, module: str, args: list[str]) -> None:
        if done.exists():
            log.info("%s: %s exists, skipped (delete it to redo the step)", name, done)
            return
        command = [sys.executable, "-m", module, *args]
        log.info("%s: %s", name, " ".join(command))
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO_ROOT, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"step {name} failed (exit {result.returncode}): {cli.command(module, *args)}")
        self.timings[name] = {"seconds": round(time.perf_counter() - started, 1), "command": " ".join(command[1:])}
        self.out.mkdir(parents=True, exist_ok=True)
        write_file_atomic(self.path, (json.dumps(self.timings, indent=2) + "\n").encode())


def _relative(path: Path) -> str:
    """A path as the step's records keep it: relative to the checkout (`../shared/data/...`), valid on any machine."""
    return os.path.relpath(path.resolve(), REPO_ROOT)


def run(settings: Settings) -> Path:
    data = settings.data_root
    for name in ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "svamp/test.jsonl"):
        if not (data / name).is_file():
            raise FileNotFoundError(f"{data / name}: missing (see ../shared/data/README.md)")
    timings: dict[str, Any] = {}
    for key in settings.bases:
        plan = PLANS[key]
        root = settings.out / key
        steps = Steps(root)  # one file per base, so two bases can run side by side
        heads = []
        for head in plan.heads:
            folder = root / "heads" / head.name
            heads.append(_relative(folder))
            if settings.stage == "evaluate":
                continue
            steps.run(f"fit/{head.name}", folder / "head_config.json", "training.fit", [
                "--base", plan.base, "--data", _relative(data / "gsm8k" / "train.jsonl"), "--task", "math",
                "--limit", str(settings.train_limit), "--epochs", str(settings.epochs), "--eval-every", "20",
                "--seed", "0", *plan.fit_args, *head.args, *settings.fit_extra, "--out", _relative(folder)])
        if settings.stage == "fit":
            continue
        max_new = str(settings.max_new_tokens or plan.max_new_tokens)
        for dataset, limit, sweep in (("gsm8k", settings.gsm8k_limit, True), ("svamp", settings.svamp_limit, False)):
            report = root / dataset
            extra = ["--sweep", "--sweep-limit", str(settings.sweep_limit)] if sweep else []
            steps.run(f"evaluate/{dataset}", report / "report.json", "training.evaluate", [
                "--base", plan.base, "--heads", *heads, "--data", _relative(data / dataset), "--split", "test",
                "--limit", str(limit), "--max-new-tokens", max_new, "--seed", "0", *extra, "--out", _relative(report)])
    for key in PLANS:  # every base's costs so far, also those of a base run separately
        path = settings.out / key / "timings.json"
        if path.is_file():
            timings.update({f"{key}/{name}": t for name, t in json.loads(path.read_text()).items()})
    summary = settings.out / "summary.md"
    write_file_atomic(summary, render_summary(settings, timings).encode())
    return summary


def render_summary(settings: Settings, timings: dict[str, Any]) -> str:
    """One page: every report's table under its base and data set, then what each step cost."""
    from training.report import markdown_table

    parts = ["# Research table v2\n", f"Written by `{cli.command('training.research', '--out', settings.out)}`"
             + (" --quick" if settings.quick else "") + ".\n"]
    for key in PLANS:
        for dataset in ("gsm8k", "svamp"):
            path = settings.out / key / dataset / "report.json"
            if not path.is_file():
                continue
            report = json.loads(path.read_text())
            parts.append(f"## {key}, {dataset} ({report['n_examples']} problems)\n")
            parts.append(markdown_table(report["rows"]) + "\n")
            parts.append(f"Details, sweep and samples: [{key}/{dataset}/report.md]({key}/{dataset}/report.md)\n")
    parts.append("## What each step cost (wall time on this machine)\n")
    parts.append("| step | seconds |\n|---|---:|")
    parts.extend(f"| {name} | {t['seconds']:.0f} |" for name, t in timings.items())
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = parse_args(argv)
    try:
        summary = run(settings)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {summary}")


if __name__ == "__main__":
    main()
