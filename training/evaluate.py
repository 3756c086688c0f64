"""Compare trained heads against the base's own LM head on held-out math problems.

    python -m training.evaluate --heads registry/math --data data/math --out reports/math

Rows: `greedy` and `top_k` (the base's linear head, decoded both ways) and one greedy row per
head. Each row gets teacher-forced cross-entropy and perplexity on the reference solutions,
exact-match accuracy of the final answer with a bootstrap interval, numeric error of the
answers, token overlap with the reference, and decoding speed. Writes report.json, report.md
and report.png into --out, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from heads import HeadError, load_head
from heads.base import Base, default_base, load_base
from training.data import (
    PROMPT_TEMPLATE,
    DataError,
    Example,
    encode,
    extract_answer,
    format_prompt,
    format_target,
    load_examples,
)
from training.decoding import Strategy, generate, target_cross_entropy
from training.metrics import accuracy_with_ci, mean_token_prf, numeric_errors

log = logging.getLogger("training.evaluate")
N_SAMPLES = 3  # sample generations per row in report.json: enough to eyeball, small enough to read
BASE_ROWS = ("greedy", "top_k")

NOTES = """\
How each column is measured:
- **CE**: teacher-forced cross-entropy in nats per target token (solution + final answer + EOS, prompt
  excluded), using that row's logits on the row's own prompt format. The `top_k` row reports the base
  distribution's CE, identical to `greedy`: sampling changes what is generated, not the distribution.
- **PPL**: exp(CE).
- **Acc [95% CI]**: exact match of the final answer extracted from the generated text against
  `expected_answer`, after normalising numbers (`12.0` == `12`, `1,200` == `1200`); the interval is a
  percentile bootstrap over examples (1000 resamples, seeded).
- **MSE / RMSE (n)**: squared error of the answer over the n examples where both the predicted and the
  expected answer parse as numbers.
- **P / R / F1**: bag-of-tokens overlap (as SQuAD F1) between the generated text and the reference target,
  both tokenised by the base tokenizer, averaged over examples.
- **tok/s**: generated tokens (EOS included) / wall seconds of the batched decode; **tokens**: their total.
"""


@dataclass
class RowSpec:
    """One line of the report: which output head, how it decodes, how its prompts are written."""

    name: str
    strategy: Strategy
    head: nn.Module | None  # None: the base's own linear LM head
    head_type: str
    template: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=default_base(), help="HF folder or hub id (default: the embedded base)")
    parser.add_argument("--heads", nargs="*", default=[], type=Path, help="head folders; none: base rows only")
    parser.add_argument("--data", required=True, help="JSONL/Parquet file, folder with {split}.jsonl, or hub id")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json, report.md, report.png")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200, help="examples to evaluate (0: all)")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="top-k sampling and bootstrap seed")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    for name in ("top_k", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit < 0:
        parser.error("--limit must be >= 0")
    return args


def load_rows(head_dirs: list[Path], base: Base) -> list[RowSpec]:
    """The base rows plus one per head; every head is checked against the base before any decoding."""
    rows = [RowSpec("greedy", "greedy", None, "linear (base)", PROMPT_TEMPLATE),
            RowSpec("top_k", "top_k", None, "linear (base)", PROMPT_TEMPLATE)]
    for head_dir in head_dirs:
        name = head_dir.resolve().name
        if name in {r.name for r in rows}:
            raise ValueError(f"{head_dir}: row name {name!r} is already taken; rename the head folder")
        try:
            head, meta = load_head(head_dir, fingerprint=base.fingerprint, vocab_size=base.vocab_size,
                                   n_embd=base.n_embd)
        except HeadError as e:
            raise HeadError(str(e) if str(head_dir) in str(e) else f"{head_dir}: {e}") from None
        rows.append(RowSpec(name, "greedy", head.to(base.device), meta.head_type, meta.prompt_template))
    return rows


def evaluate_row(spec: RowSpec, base: Base, examples: list[Example], args: argparse.Namespace,
                 ce: tuple[float, int]) -> dict[str, Any]:
    """Generate for every example with this row's head and strategy, then score the generations."""
    tokenizer = base.tokenizer
    prompts = [tokenizer(format_prompt(ex.problem, spec.template))["input_ids"] for ex in examples]
    bar = tqdm(total=len(prompts), desc=f"generate {spec.name}", file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    gens = generate(base, prompts, head=spec.head, strategy=spec.strategy, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                    on_batch=bar.update)
    seconds = time.perf_counter() - started
    bar.close()
    predicted = [extract_answer(g.text) for g in gens]
    expected = [ex.answer for ex in examples]
    acc = accuracy_with_ci(predicted, expected, seed=args.seed)
    errors = numeric_errors(predicted, expected)
    prf = mean_token_prf([tokenizer(g.text)["input_ids"] for g in gens],
                         [tokenizer(format_target(ex))["input_ids"] for ex in examples])
    total_nll, n_target = ce
    cross_entropy = total_nll / n_target
    generated = sum(g.n_tokens for g in gens)
    samples = [{"problem": ex.problem, "expected_answer": ex.answer, "generated_text": g.text,
                "predicted_answer": p, "finish_reason": g.finish_reason}
               for ex, g, p in list(zip(examples, gens, predicted, strict=True))[:N_SAMPLES]]
    return {
        "name": spec.name, "head_type": spec.head_type, "strategy": spec.strategy,
        "prompt_template": spec.template,
        "cross_entropy": cross_entropy, "perplexity": math.exp(cross_entropy) if cross_entropy < 700 else math.inf,
        "ce_target_tokens": n_target,
        "accuracy": acc.accuracy, "accuracy_ci_low": acc.ci_low, "accuracy_ci_high": acc.ci_high,
        "n_correct": acc.n_correct, "n": acc.n,
        "mse": errors.mse, "rmse": errors.rmse, "n_parsed": errors.n_parsed,
        "token_precision": prf.precision, "token_recall": prf.recall, "token_f1": prf.f1,
        "generated_tokens": generated, "finish_reasons": dict(sorted(Counter(g.finish_reason for g in gens).items())),
        "generation_seconds": seconds, "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        "samples": samples,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    """Fixed digits, or scientific notation once a value is too large to read (runaway answers)."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}e}" if abs(value) >= 1e6 else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | CE (nats/tok) | PPL | Acc [95% CI] | MSE | RMSE (n) | P | R | F1 | tok/s | tokens |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {_fmt(r['cross_entropy'])} | {_fmt(r['perplexity'], 2)} | "
            f"{_fmt(r['accuracy'])} [{_fmt(r['accuracy_ci_low'])}, {_fmt(r['accuracy_ci_high'])}] | "
            f"{_fmt(r['mse'], 2)} | {_fmt(r['rmse'], 2)} ({r['n_parsed']}) | {_fmt(r['token_precision'])} | "
            f"{_fmt(r['token_recall'])} | {_fmt(r['token_f1'])} | {r['tokens_per_s']:.1f} | {r['generated_tokens']} |")
    return "\n".join(lines) + "\n"


def plot_png(rows: list[dict[str, Any]]) -> bytes:
    """Accuracy with its interval, and perplexity, one bar per row (Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r["name"] for r in rows]
    fig = Figure(figsize=(max(8.0, 2.0 + 2.0 * len(rows)), 4.0))
    FigureCanvasAgg(fig)
    ax_acc, ax_ppl = fig.subplots(1, 2)
    acc = [r["accuracy"] for r in rows]
    yerr = [[max(0.0, a - r["accuracy_ci_low"]) for a, r in zip(acc, rows, strict=True)],
            [max(0.0, r["accuracy_ci_high"] - a) for a, r in zip(acc, rows, strict=True)]]
    ax_acc.bar_label(ax_acc.bar(names, acc, yerr=yerr, capsize=4, color="tab:blue"), fmt="%.2f")
    ax_acc.set_ylim(0, 1.05)
    ax_acc.set_title("answer accuracy, 95% bootstrap CI", fontsize=10)
    bars = ax_ppl.bar(names, [r["perplexity"] for r in rows], color="tab:orange")
    ax_ppl.bar_label(bars, fmt="%.2f")
    ax_ppl.set_title("target perplexity (lower is better)", fontsize=10)
    for ax in (ax_acc, ax_ppl):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file then os.replace: a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base(args.base, device=device)
    specs = load_rows(args.heads, base)
    examples, stats = load_examples(args.data, args.split, limit=args.limit or None)
    if stats.skipped:
        log.warning("skipped %d of %d rows: %s", sum(stats.skipped.values()), stats.rows, stats.skipped)
    if not examples:
        raise DataError(f"{args.data}: no usable {args.split} examples ({stats.rows} rows read)")
    log.info("evaluating %d rows on %d %s examples with %s on %s", len(specs), len(examples), args.split,
             base.name, device)
    ce_cache: dict[tuple[int, str], tuple[float, int]] = {}  # the top_k row shares greedy's distribution
    rows = []
    for spec in specs:
        key = (id(spec.head), spec.template)
        if key not in ce_cache:
            encoded, enc_stats = encode(examples, base.tokenizer, base.n_positions, spec.template)
            if enc_stats.dropped or enc_stats.truncated:
                log.warning("%s: %d examples dropped and %d truncated to fit the context", spec.name,
                            enc_stats.dropped, enc_stats.truncated)
            ce_cache[key] = target_cross_entropy(base, encoded, head=spec.head, batch_size=args.batch_size)
        rows.append(evaluate_row(spec, base, examples, args, ce_cache[key]))
        log.info("%s: accuracy %.3f, perplexity %.3f", spec.name, rows[-1]["accuracy"], rows[-1]["perplexity"])
    report = {
        "base": base.info()["base_model_name_or_path"], "base_fingerprint": base.fingerprint,
        "data": str(args.data), "split": args.split, "n_examples": len(examples), "seed": args.seed,
        "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "device": device, "rows": rows,
    }
    table = markdown_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "report.json", (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    header = (f"# Evaluation: {report['base']}\n\n{len(examples)} examples from `{args.data}` ({args.split}), "
              f"seed {args.seed}, top-k {args.top_k}, max {args.max_new_tokens} new tokens.\n\n")
    write_atomic(args.out / "report.md", (header + table + "\n" + NOTES).encode())
    write_atomic(args.out / "report.png", plot_png(rows))
    report["markdown_table"] = table
    return report


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        report = run(args)
    except (DataError, HeadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report["markdown_table"], end="")


if __name__ == "__main__":
    main()
