"""Compare trained heads against the base's own LM head on held-out math problems.

    python -m training.evaluate --heads runs/my-math --data data/my-math --out reports/my-math [--sweep]

Rows: `greedy` and `top_k` (the base's linear head, decoded both ways) and one greedy row per head. Each row
gets teacher-forced cross-entropy and perplexity on the reference solutions, exact-match accuracy of the final
answer with a bootstrap interval and its paired difference from `greedy` on the same problems, MSE/RMSE of the
answers with robust companions, token overlap with the reference, decoding speed, and the same sample
generations. `--sweep` also decodes the base and every head over a grid of temperatures and top-k values
(`training.sweep`): does a head make decoding less sensitive to them? Writes report.json, report.md and the
PNG plots into --out, and prints the markdown table. `--from-json reports/x/report.json` renders report.md and
the plots again from the JSON alone. Classifier and verbalizer heads (or `--task classify`) are evaluated on
labelled texts instead: training/evaluate_classifier.py.
"""

from __future__ import annotations

import argparse
import logging
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
from heads.prompts import PromptStyle, training_style
from training import cli, evaluate_classifier
from training.data import DataError, Example, encode, extract_answer, format_target, load_examples
from training.decoding import Generation, generate
from training.hidden_cache import TargetStates, target_states
from training.metrics import (
    accuracy_with_ci,
    exact_matches,
    mean_token_prf,
    numeric_errors,
    paired_bootstrap,
    share_within,
)
from training.reference import reference_ce, reference_curves
from training.report import markdown_table, rerender, write_report
from training.sweep import (
    GREEDY,
    SWEEP_LIMIT,
    TEMPERATURES,
    TOP_KS,
    DecodeKey,
    Grid,
    PointDecode,
    bits,
    perplexity,
    sweep_row,
)

log = logging.getLogger("training.evaluate")
N_SAMPLES = 3  # sample generations per row in report.json: enough to eyeball, small enough to read
BASE_ROWS = ("greedy", "top_k")
BASE_MODEL = "base"  # the sweep's name for the base's own LM head (both base rows decode with it)


@dataclass(frozen=True)
class Model:
    """An output head on the base and how its prompts are written: what one decode runs."""

    name: str
    head: HeadModule | None  # None: the base's own linear LM head
    head_type: str
    style: PromptStyle  # the head's own, as the server formats for it; the base's: training's default


@dataclass(frozen=True)
class RowSpec:
    """One line of the main table: a model and one way of decoding it."""

    name: str
    model: Model
    key: DecodeKey  # sweep.GREEDY or ("top_k", k, temperature)


@dataclass
class Decoded:
    generations: list[Generation]
    seconds: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser("training.evaluate", __doc__)
    parser.add_argument("--base", default=default_base(), help=base_names_help())
    parser.add_argument("--heads", nargs="*", default=[], type=Path, help="head folders, one row each (the row is "
                        "named after the folder); none: base rows only")
    parser.add_argument("--data", help="JSONL/Parquet file, folder with {split}.jsonl, or hub id (required)")
    parser.add_argument("--out", type=Path, help="folder for report.json, report.md and the plots (required)")
    parser.add_argument("--split", default=None, help="which split of --data to evaluate on (default: test; "
                        "classification: dev)")
    parser.add_argument("--limit", type=int, default=None, help="examples to evaluate, the first of the split (0: all; "
                        "default: 200, classification: all)")
    parser.add_argument("--top-k", type=int, default=50, help="k of the base's top-k row (sampled at temperature 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per example")
    parser.add_argument("--batch-size", type=int, default=32, help="examples decoded together")
    parser.add_argument("--cache-hidden", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the base's hidden states of the references on disk (HEADSERVE_CACHE_DIR), so a "
                             "second evaluation on the same data skips the base pass")
    parser.add_argument("--sweep", action="store_true", help="also decode the base and every head at each "
                        "--temperatures x --top-ks point (the paper's 'no tuning needed' claim)")
    parser.add_argument("--sweep-limit", type=int, default=SWEEP_LIMIT,
                        help="problems per sweep point: the first of the evaluated ones (0: all)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES),
                        help="sweep temperatures (0: greedy)")
    parser.add_argument("--top-ks", type=int, nargs="+", default=list(TOP_KS), help="sweep top-k values (1: greedy)")
    parser.add_argument("--from-json", type=Path, metavar="REPORT_JSON",
                        help="only render report.md and the plots again beside this report.json (no decoding)")
    evaluate_classifier.add_arguments(parser)
    args = evaluate_classifier.resolve(parser.parse_args(argv), parser)
    if args.from_json is None and (args.data is None or args.out is None):
        parser.error("--data and --out are required (unless --from-json)")
    for name in ("top_k", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("limit", "sweep_limit"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if any(t < 0 for t in args.temperatures) or any(k < 1 for k in args.top_ks):
        parser.error("--temperatures must be >= 0 and --top-ks >= 1")
    args.temperatures = list(dict.fromkeys(args.temperatures))
    args.top_ks = list(dict.fromkeys(args.top_ks))
    return args


def load_models(head_dirs: list[Path], base: Base) -> list[Model]:
    """The base's own head plus one model per head; every head is checked against the base before any decoding."""
    models = [Model(BASE_MODEL, None, "linear (base)", training_style(base.tokenizer))]
    for head_dir in head_dirs:
        name = head_dir.resolve().name
        if name in {m.name for m in models} | set(BASE_ROWS):
            raise ValueError(f"{head_dir}: row name {name!r} is already taken; rename the head folder")
        try:
            head, meta = load_head(head_dir, fingerprint=base.fingerprint, vocab_size=base.vocab_size,
                                   n_embd=base.n_embd)
        except HeadError as e:
            raise HeadError(str(e) if str(head_dir) in str(e) else f"{head_dir}: {e}") from None
        if not head.generative:  # label logits only: scored by training/evaluate_classifier.py
            raise HeadError(f"{head_dir}: a {meta.head_type} head cannot generate; evaluate it with --task classify")
        head = head.to(base.device)
        head.eval()
        models.append(Model(name, head, meta.head_type, meta.prompt_style))
    return models


def main_rows(models: list[Model], top_k: int) -> list[RowSpec]:
    base, heads = models[0], models[1:]
    return [RowSpec("greedy", base, GREEDY), RowSpec("top_k", base, ("top_k", top_k, 1.0)),
            *(RowSpec(m.name, m, GREEDY) for m in heads)]


def decode_all(base: Base, jobs: dict[tuple[str, DecodeKey], int], models: dict[str, Model],
               examples: list[Example], args: argparse.Namespace) -> dict[tuple[str, DecodeKey], Decoded]:
    """Each (model, decode) once, on the first n examples it is needed for; one progress bar (ETA) over them all."""
    out: dict[tuple[str, DecodeKey], Decoded] = {}
    bar = tqdm(total=sum(jobs.values()), desc="decode", unit="problem", file=sys.stderr, dynamic_ncols=True)
    for i, ((name, key), n) in enumerate(jobs.items()):
        model = models[name]
        bar.set_description(f"decode {i + 1}/{len(jobs)}: {name} {label(key)}")
        prompts = [model.style.ids(ex.problem, base.tokenizer) for ex in examples[:n]]
        _, top_k, temperature = key
        started = time.perf_counter()
        gens = generate(base, prompts, head=model.head, strategy="greedy" if key == GREEDY else "top_k",
                        top_k=top_k or 1, temperature=temperature or 1.0, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, batch_size=args.batch_size, on_batch=bar.update,
                        end_ids=model.style.end_ids(base.tokenizer))
        out[(name, key)] = Decoded(gens, time.perf_counter() - started)
    bar.close()
    return out


def label(key: DecodeKey) -> str:
    return "greedy" if key == GREEDY else f"top-{key[1]} T={key[2]:g}"


def score_row(spec: RowSpec, decoded: Decoded, examples: list[Example], base: Base, ce: tuple[float, int],
              greedy_correct: list[bool] | None, seed: int) -> dict[str, Any]:
    """The main table's columns for one row's generations."""
    tokenizer, gens = base.tokenizer, decoded.generations
    predicted = [extract_answer(g.text) for g in gens]
    expected = [ex.answer for ex in examples]
    acc = accuracy_with_ci(predicted, expected, seed=seed)
    correct = exact_matches(predicted, expected)
    errors = numeric_errors(predicted, expected)
    prf = mean_token_prf([tokenizer(g.text)["input_ids"] for g in gens],
                         [tokenizer(format_target(ex))["input_ids"] for ex in examples])
    paired = None
    if greedy_correct is not None:
        diff = paired_bootstrap([float(c) for c in correct], [float(c) for c in greedy_correct], seed=seed)
        paired = {"difference": diff.difference, "ci_low": diff.ci_low, "ci_high": diff.ci_high,
                  "share_better": diff.share_better, "n": diff.n}
    total_nll, n_target = ce
    cross_entropy = total_nll / max(1, n_target)
    generated = sum(g.n_tokens for g in gens)
    samples = [{"problem": ex.problem, "expected_answer": ex.answer, "generated_text": g.text,
                "predicted_answer": p, "finish_reason": g.finish_reason}
               for ex, g, p in list(zip(examples, gens, predicted, strict=True))[:N_SAMPLES]]
    strategy, top_k, temperature = spec.key
    return {
        "name": spec.name, "head_type": spec.model.head_type, "strategy": strategy,
        "top_k": top_k if spec.key != GREEDY else None, "temperature": temperature if spec.key != GREEDY else None,
        "prompt_template": spec.model.style.template, "prompt_format": spec.model.style.format,
        "cross_entropy": cross_entropy, "perplexity": perplexity(cross_entropy), "ce_target_tokens": n_target,
        "accuracy": acc.accuracy, "accuracy_ci_low": acc.ci_low, "accuracy_ci_high": acc.ci_high,
        "n_correct": acc.n_correct, "n": acc.n, "correct": bits(correct), "paired_vs_greedy": paired,
        "median_abs_error": errors.median_abs_error, "log10_error": errors.log10_error,
        "within_1pct": share_within(predicted, expected, rel=0.01),
        "mse": errors.mse, "rmse": errors.rmse, "n_parsed": errors.n_parsed,
        "token_precision": prf.precision, "token_recall": prf.recall, "token_f1": prf.f1,
        "generated_tokens": generated, "finish_reasons": dict(sorted(Counter(g.finish_reason for g in gens).items())),
        "generation_seconds": decoded.seconds,
        "tokens_per_s": generated / decoded.seconds if decoded.seconds > 0 else 0.0,
        "samples": samples,
    }


def reference_states(base: Base, models: list[Model], examples: list[Example], use_disk: bool,
                     ) -> dict[PromptStyle, TargetStates]:
    """One base pass per prompt style over the references (from disk when an earlier run made it)."""
    states: dict[PromptStyle, TargetStates] = {}
    for model in models:
        if model.style in states:
            continue
        encoded, enc = encode(examples, base.tokenizer, base.n_positions, model.style)
        if enc.dropped or enc.truncated:
            log.warning("%s prompts: %d examples dropped and %d truncated to fit the context", model.style.format,
                        enc.dropped, enc.truncated)
        states[model.style] = target_states(base, encoded, use_disk=use_disk,
                                            desc=f"base pass ({model.style.format} prompts)")
    return states


def run_sweep(grid: Grid, models: list[Model], specs: list[RowSpec], decoded: dict[tuple[str, DecodeKey], Decoded],
              examples: list[Example], states: dict[PromptStyle, TargetStates], base: Base,
              seed: int) -> dict[str, Any]:
    """The sweep block of report.json from the decodes already made (main rows' decodes reused, never redone)."""
    reused_from = {(s.model.name, s.key): s.name for s in specs}
    expected = [ex.answer for ex in examples[:grid.limit]]
    rows = []
    for model in models:
        decodes = {}
        for key in grid.keys():
            gens = decoded[(model.name, key)].generations[:grid.limit]
            row = reused_from.get((model.name, key))
            source = "greedy" if key == GREEDY else f"{row} row" if row is not None else "sampled"
            decodes[key] = PointDecode([extract_answer(g.text) for g in gens], sum(g.n_tokens for g in gens), source)
        curves = reference_curves(model.head, states[model.style], base.embeddings,
                                  temperatures=grid.sampling_temperatures, top_ks=grid.top_ks)
        rows.append(sweep_row(model.name, model.head_type, grid, decodes, expected, curves, seed=seed))
    return {"temperatures": list(grid.temperatures), "top_ks": list(grid.top_ks), "n_examples": len(expected),
            "seed": seed, "rows": rows}


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Path]]:
    """Decode, score and write the report; returns it and the files written."""
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base(args.base, device=device)
    models = load_models(args.heads, base)
    specs = main_rows(models, args.top_k)
    examples, stats = load_examples(args.data, args.split, limit=args.limit or None)
    if stats.skipped:
        log.warning("skipped %d of %d rows: %s", sum(stats.skipped.values()), stats.rows, stats.skipped)
    if not examples:
        raise DataError(f"{args.data}: no usable {args.split} examples ({stats.rows} rows read)")
    grid = Grid(tuple(args.temperatures), tuple(args.top_ks), min(args.sweep_limit or len(examples), len(examples)))
    log.info("evaluating %d rows on %d %s examples with %s on %s%s", len(specs), len(examples), args.split,
             base.name, device, f"; sweeping {len(grid.points())} settings on {grid.limit}" if args.sweep else "")

    states = reference_states(base, models, examples, args.cache_hidden)
    ce = {m.name: reference_ce(m.head, states[m.style], base.embeddings) for m in models}
    jobs = {(s.model.name, s.key): len(examples) for s in specs}
    if args.sweep:
        for model in models:
            for key in grid.keys():
                jobs.setdefault((model.name, key), grid.limit)  # a main row's decode covers the sweep's problems
    decoded = decode_all(base, jobs, {m.name: m for m in models}, examples, args)

    rows: list[dict[str, Any]] = []
    for spec in specs:
        greedy_correct = None if not rows else [c == "1" for c in rows[0]["correct"]]
        rows.append(score_row(spec, decoded[(spec.model.name, spec.key)], examples, base, ce[spec.model.name],
                              greedy_correct, args.seed))
        log.info("%s: accuracy %.3f, perplexity %.3f", spec.name, rows[-1]["accuracy"], rows[-1]["perplexity"])
    report = {
        "base": base.info()["base_model_name_or_path"], "base_fingerprint": base.fingerprint,
        "data": str(args.data), "split": args.split, "n_examples": len(examples), "seed": args.seed,
        "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "device": device, "rows": rows,
        "reference_passes": [{"prompt_format": style.format, "prompt_template": style.template, **s.stats()}
                             for style, s in states.items()],
        "sweep": run_sweep(grid, models, specs, decoded, examples, states, base, args.seed) if args.sweep else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return report, write_report(report, args.out)


def summary(args: argparse.Namespace, report: dict[str, Any], written: list[Path]) -> str:
    """Where the report went, and how to try the evaluated heads on a server with one of the problems."""
    lines = [f"wrote {', '.join(map(str, written))}: {len(report['rows'])} rows on {report['n_examples']} "
             f"{report['split']} examples"]
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
    if args.task == "classify":  # classifier and verbalizer heads: training/evaluate_classifier.py
        return evaluate_classifier.main(args)
    with cli.user_errors(report=args.from_json or args.out):
        if args.from_json is not None:
            written = rerender(args.from_json)
            print(f"wrote {', '.join(map(str, written))} (rendered from {args.from_json})")
            return
        report, written = run(args)
    print(markdown_table(report["rows"]))
    print(summary(args, report, written))


if __name__ == "__main__":
    main()
