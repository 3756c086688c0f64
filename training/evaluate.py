"""Compare trained heads against the base's own LM head on held-out math problems.

    python -m training.evaluate --heads runs/my-math --data data/my-math --out reports/my-math

Rows: `greedy` and `top_k` (the base's linear head, decoded both ways) and one greedy row per
head. Each row gets teacher-forced cross-entropy and perplexity on the reference solutions,
exact-match accuracy of the final answer with a bootstrap interval, robust numeric errors of the
answers, token overlap with the reference, decoding speed, and the same sample generations.
Writes report.json, report.md and report.png into --out, and prints the markdown table.
`--from-json reports/x/report.json` renders report.md again from the JSON alone.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from heads import HeadError, HeadModule, load_head
from heads.base import Base, default_base, load_base
from heads.base_sources import base_names_help
from heads.errors import BaseModelError
from heads.prompts import PromptStyle, training_style
from training import cli
from training.data import (
    DataError,
    Example,
    encode,
    extract_answer,
    format_target,
    load_examples,
)
from training.decoding import Strategy, generate, target_cross_entropy
from training.metrics import accuracy_with_ci, mean_token_prf, numeric_errors
from training.report import markdown_table, rerender_markdown, write_report

log = logging.getLogger("training.evaluate")
N_SAMPLES = 3  # sample generations per row in report.json: enough to eyeball, small enough to read
BASE_ROWS = ("greedy", "top_k")



@dataclass
class RowSpec:
    """One line of the report: which output head, how it decodes, how its prompts are written."""

    name: str
    strategy: Strategy
    head: HeadModule | None  # None: the base's own linear LM head
    head_type: str
    style: PromptStyle  # the head's own, as the server formats for it; the base rows: training's default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser("training.evaluate", __doc__)
    parser.add_argument("--base", default=default_base(), help=base_names_help())
    parser.add_argument("--heads", nargs="*", default=[], type=Path, help="head folders, one row each (the row is "
                        "named after the folder); none: base rows only")
    parser.add_argument("--data", help="JSONL/Parquet file, folder with {split}.jsonl, or hub id (required)")
    parser.add_argument("--out", type=Path, help="folder for report.json, report.md, report.png (required)")
    parser.add_argument("--split", default="test", help="which split of --data to evaluate on")
    parser.add_argument("--limit", type=int, default=200, help="examples to evaluate (0: all)")
    parser.add_argument("--top-k", type=int, default=50, help="k of the base's top-k row")
    parser.add_argument("--seed", type=int, default=0, help="top-k sampling and bootstrap seed")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per example")
    parser.add_argument("--batch-size", type=int, default=16, help="examples decoded together")
    parser.add_argument("--from-json", type=Path, metavar="REPORT_JSON",
                        help="only render report.md again beside this report.json (no decoding)")
    args = parser.parse_args(argv)
    if args.from_json is None and (args.data is None or args.out is None):
        parser.error("--data and --out are required (unless --from-json)")
    for name in ("top_k", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit < 0:
        parser.error("--limit must be >= 0")
    return args


def load_rows(head_dirs: list[Path], base: Base) -> list[RowSpec]:
    """The base rows plus one per head; every head is checked against the base before any decoding."""
    default = training_style(base.tokenizer)
    rows = [RowSpec("greedy", "greedy", None, "linear (base)", default),
            RowSpec("top_k", "top_k", None, "linear (base)", default)]
    for head_dir in head_dirs:
        name = head_dir.resolve().name
        if name in {r.name for r in rows}:
            raise ValueError(f"{head_dir}: row name {name!r} is already taken; rename the head folder")
        try:
            head, meta = load_head(head_dir, fingerprint=base.fingerprint, vocab_size=base.vocab_size,
                                   n_embd=base.n_embd)
        except HeadError as e:
            raise HeadError(str(e) if str(head_dir) in str(e) else f"{head_dir}: {e}") from None
        rows.append(RowSpec(name, "greedy", head.to(base.device), meta.head_type, meta.prompt_style))
    return rows


def evaluate_row(spec: RowSpec, base: Base, examples: list[Example], args: argparse.Namespace,
                 ce: tuple[float, int]) -> dict[str, Any]:
    """Generate for every example with this row's head and strategy, then score the generations."""
    tokenizer = base.tokenizer
    prompts = [spec.style.ids(ex.problem, tokenizer) for ex in examples]
    bar = tqdm(total=len(prompts), desc=f"generate {spec.name}", file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    gens = generate(base, prompts, head=spec.head, strategy=spec.strategy, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                    on_batch=bar.update, end_ids=spec.style.end_ids(tokenizer))
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
        "prompt_template": spec.style.template, "prompt_format": spec.style.format,
        "cross_entropy": cross_entropy, "perplexity": math.exp(cross_entropy) if cross_entropy < 700 else math.inf,
        "ce_target_tokens": n_target,
        "accuracy": acc.accuracy, "accuracy_ci_low": acc.ci_low, "accuracy_ci_high": acc.ci_high,
        "n_correct": acc.n_correct, "n": acc.n,
        "median_abs_error": errors.median_abs_error, "log10_error": errors.log10_error,
        "mse": errors.mse, "rmse": errors.rmse, "n_parsed": errors.n_parsed,
        "token_precision": prf.precision, "token_recall": prf.recall, "token_f1": prf.f1,
        "generated_tokens": generated, "finish_reasons": dict(sorted(Counter(g.finish_reason for g in gens).items())),
        "generation_seconds": seconds, "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        "samples": samples,
    }


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
    ce_cache: dict[tuple[int, PromptStyle], tuple[float, int]] = {}  # the top_k row shares greedy's distribution
    rows = []
    for spec in specs:
        key = (id(spec.head), spec.style)
        if key not in ce_cache:
            encoded, enc_stats = encode(examples, base.tokenizer, base.n_positions, spec.style)
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
    write_report(report, args.out)
    return report


def summary(args: argparse.Namespace, report: dict[str, Any]) -> str:
    """Where the report went, and how to try the evaluated heads on a server with one of the problems."""
    out = args.out
    lines = [f"wrote {out / 'report.md'}, {out / 'report.json'} and {out / 'report.png'}: {len(report['rows'])} rows "
             f"on {report['n_examples']} {report['split']} examples"]
    heads = [(path, row) for path, row in zip(args.heads, report["rows"][len(BASE_ROWS):], strict=True)]
    if not heads:
        return lines[0]
    steps = [cli.command("clients", "register", path, "--name", row["name"]) + "   # with the server running"
             for path, row in heads]
    path, row = heads[0]
    if row["samples"]:
        steps.append(cli.command("clients", "generate", "--head", row["name"], row["samples"][0]["problem"],
                                 "--compare"))
    return "\n".join(lines + [cli.next_steps(steps)])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        if args.from_json is not None:
            print(f"wrote {rerender_markdown(args.from_json)} (rendered from {args.from_json})")
            return
        report = run(args)
    except (BaseModelError, DataError, HeadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyError as e:
        print(f"error: {args.from_json or args.out}: not a report written by training.evaluate (no {e})",
              file=sys.stderr)
        raise SystemExit(2) from None
    print(markdown_table(report["rows"]))
    print(summary(args, report))


if __name__ == "__main__":
    main()
