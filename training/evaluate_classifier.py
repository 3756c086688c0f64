"""Evaluate classification heads on a labelled split (dev by default), beside reference numbers.

    python -m training.evaluate --heads runs/sentiment-sst runs/sst-verbalizer --data ../shared/data/sst \\
        --out reports/sentiment-sst --label-words " terrible, bad, okay, good, excellent" \\
        --reference "last-layer GPT-2 124M=0.462" --reference "full fine-tune GPT-2 124M=0.513"

training.evaluate comes here (`--task classify`, the default when every head given is a classifier or a
verbalizer). Rows: each classifier head (label logits of the pooled prompt state), each verbalizer (a generative
head whose metadata names labels and their first tokens: its next-token logits on those tokens) and, with
`--label-words`, the base's own LM head zero-shot on the words' first tokens. The base runs once per prompt style
over the texts (the pooled states, cached as training.fit caches them), so every row costs only its head.
Each row gets accuracy with a 95% bootstrap interval, its paired difference from the first row, macro-F1,
per-class precision/recall/F1 and a confusion matrix (PNG). Writes report.json, report.md and the PNGs into --out.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from heads import HeadError, HeadModule, get_head_type, load_head, read_metadata
from heads.base import Base, load_base
from heads.classifier import ClassifierHead, verbalizer_ids
from heads.folders import write_file_atomic
from heads.prompts import PROMPT_FORMATS, PromptStyle, training_style
from training import cli
from training.classify_data import CLASSIFY_TEMPLATE, encode_prompts, label_names, load_labelled, split_list
from training.classify_metrics import scores
from training.data import DataError
from training.fit_classifier import Features, pooled_features
from training.metrics import bootstrap_ci, paired_bootstrap

log = logging.getLogger("training.evaluate")
BASE_ROW = "base (zero-shot)"
DECODE_ROWS = 256  # verbalizer rows per decode: bounds the (rows, V) logits a head gives at once
NOTES = """\
How each column is measured:
- **Acc [95% CI]**: share of texts whose highest-probability label is the true one; percentile bootstrap over
  texts (1000 resamples, seeded). **Δ vs first**: the row's accuracy minus the first row's on the same texts,
  with a paired bootstrap interval.
- **macro-F1**: the mean over labels (those that occur as truth or prediction) of each label's F1.
- A *classifier* scores the pooled final hidden state of the prompt; a *verbalizer* (and the base zero-shot) its
  next-token logits at the prompt's last position, restricted to the first token of each label word.
- Reference rows are numbers given on the command line (`--reference`), not measured here.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("classification (--task classify, or heads that are classifiers or verbalizers)")
    g.add_argument("--task", choices=("math", "classify"), default=None, help="what to evaluate (default: classify "
                   "when every head given is a classifier or a verbalizer, or with --label-words; else math)")
    g.add_argument("--label-words", default=None, help="also score the base's own LM head zero-shot on these words' "
                   "first tokens (comma-separated, in label order, e.g. ' negative, positive')")
    g.add_argument("--labels", default=None, help="label names of the zero-shot row (default: the heads' labels, "
                   "else the label words stripped)")
    g.add_argument("--reference", action="append", default=[], metavar="NAME=ACCURACY",
                   help="an accuracy measured elsewhere, shown beside ours, e.g. 'last-layer GPT-2 124M=0.462' "
                   "(repeatable)")
    g.add_argument("--prompt-template", default=None, help="the zero-shot row's prompt (default: "
                   f"{CLASSIFY_TEMPLATE!r}); a head's rows use the head's own")
    g.add_argument("--prompt-format", choices=("auto", *PROMPT_FORMATS), default="auto",
                   help="the zero-shot row's prompt format; auto: chat on a base with a chat template")


def _classifying(head_dir: Path) -> bool | None:
    """Whether a head folder classifies (a classifier, or a verbalizer); None when it cannot be read (the run
    that loads it then says why)."""
    try:
        meta = read_metadata(head_dir)
        return not get_head_type(meta.head_type).generative or meta.labels is not None
    except HeadError:
        return None


def _report_task(report_json: Path) -> str | None:
    """The task a report.json was written for (None: unreadable, or a math report from before tasks)."""
    try:
        task = json.loads(report_json.read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        return None
    return task if isinstance(task, str) else None


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Which task this evaluation is, and the defaults that follow (the dev split, every example)."""
    if args.task is None:
        kinds = [_classifying(h) for h in args.heads]
        from_json = args.from_json is not None and _report_task(args.from_json) == "classify"
        args.task = "classify" if from_json or args.label_words is not None or (kinds and all(kinds)) else "math"
    classify = args.task == "classify"
    if not classify and (args.label_words or args.labels or args.reference or args.prompt_template):
        parser.error("--label-words, --labels, --reference and --prompt-template are for --task classify")
    args.split = args.split or ("dev" if classify else "test")
    args.limit = (0 if classify else 200) if args.limit is None else args.limit
    try:
        args.references = [parse_reference(r) for r in args.reference]
    except ValueError as e:
        parser.error(str(e))
    return args


def parse_reference(text: str) -> dict[str, Any]:
    name, sep, value = text.rpartition("=")
    try:
        accuracy = float(value)
    except ValueError:
        accuracy = -1.0
    if not sep or not name.strip() or not 0 <= accuracy <= 1:
        raise ValueError(f"--reference {text!r}: expected NAME=ACCURACY with an accuracy in [0, 1]")
    return {"name": name.strip(), "accuracy": accuracy}


@dataclass(frozen=True)
class Row:
    """One way of scoring the texts: a classifier head, or next-token logits on one token per label."""

    name: str
    kind: str  # "classifier", "verbalizer" or "base zero-shot"
    head_type: str
    head: HeadModule | None  # None: the base's own LM head
    style: PromptStyle
    labels: list[str]
    label_token_ids: list[int] | None  # verbalizers only


def load_rows(args: argparse.Namespace, base: Base) -> list[Row]:
    """The zero-shot row (with --label-words) and one row per head, each checked against the base."""
    rows = []
    for head_dir in args.heads:
        name = head_dir.resolve().name
        try:
            head, meta = load_head(head_dir, fingerprint=base.fingerprint, vocab_size=base.vocab_size,
                                   n_embd=base.n_embd)
        except HeadError as e:
            raise HeadError(str(e) if str(head_dir) in str(e) else f"{head_dir}: {e}") from None
        head = head.to(base.device).eval()
        if isinstance(head, ClassifierHead):
            rows.append(Row(name, "classifier", meta.head_type, head, meta.prompt_style, head.labels, None))
        elif meta.labels is not None and meta.label_token_ids is not None:
            head.prepare(base.embeddings)
            rows.append(Row(name, "verbalizer", meta.head_type, head, meta.prompt_style, meta.labels,
                            meta.label_token_ids))
        else:
            raise HeadError(f"{head_dir}: a {meta.head_type} head with no labels cannot classify (train it with "
                            "--label-words, or evaluate it with --task math)")
    if args.label_words is not None:
        words = split_list(args.label_words, "--label-words")
        style = training_style(base.tokenizer, args.prompt_format, args.prompt_template or CLASSIFY_TEMPLATE)
        names = label_names(args.labels, [], words) if args.labels or not rows else rows[0].labels
        firsts = [ids[0] for ids in verbalizer_ids(words, base.tokenizer, style.format)]
        if len(names) != len(firsts):
            raise ValueError(f"{len(firsts)} label words for the heads' {len(names)} labels")
        rows.insert(0, Row(BASE_ROW, "base zero-shot", "linear (base)", None, style, names, firsts))
    if not rows:
        raise ValueError("nothing to evaluate: give classifier or verbalizer heads, or --label-words")
    taken = [r.name for r in rows]
    if len(set(taken)) != len(taken):
        raise ValueError(f"two rows are named alike ({taken}); rename a head folder")
    if len({len(r.labels) for r in rows}) != 1:
        raise ValueError("the rows classify into different numbers of labels: "
                         + ", ".join(f"{r.name} {len(r.labels)}" for r in rows))
    return rows


@torch.no_grad()
def probabilities(row: Row, features: Features, base: Base) -> np.ndarray:
    """(N, C) label probabilities of every text under this row."""
    if isinstance(row.head, ClassifierHead):
        pooled = torch.from_numpy(np.ascontiguousarray(features.of(row.head.config.pooling))).to(base.device)
        logits = row.head.classify(pooled)
    else:
        assert row.label_token_ids is not None
        last = torch.from_numpy(np.ascontiguousarray(features.of("last"))).to(base.device)  # (N, D)
        ids = torch.tensor(row.label_token_ids, device=base.device)
        if row.head is None:  # the base's own LM head, on the label tokens' rows only
            logits = last @ base.embeddings[ids].T.to(last.dtype)  # (N, C)
        else:
            parts = []
            for chunk in last.split(DECODE_ROWS):
                z = base.linear_logits(chunk) if row.head.accepts_base_logits else None
                parts.append(row.head.decode(chunk, base_logits=z)[:, ids])  # (n, C)
            logits = torch.cat(parts)
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()


def score_row(row: Row, probs: np.ndarray, expected: list[int], seed: int,
              first: list[float] | None) -> dict[str, Any]:
    predicted = probs.argmax(-1).tolist()
    s = scores(predicted, expected, len(row.labels))
    correct = [float(p == e) for p, e in zip(predicted, expected, strict=True)]
    low, high = bootstrap_ci(correct, seed=seed)
    paired = None
    if first is not None:
        d = paired_bootstrap(correct, first, seed=seed)
        paired = {"difference": d.difference, "ci_low": d.ci_low, "ci_high": d.ci_high,
                  "share_better": d.share_better, "n": d.n}
    return {
        "name": row.name, "kind": row.kind, "head_type": row.head_type, "labels": row.labels,
        "label_token_ids": row.label_token_ids, "prompt_template": row.style.template,
        "prompt_format": row.style.format, "accuracy": s.accuracy, "accuracy_ci_low": low, "accuracy_ci_high": high,
        "n_correct": int(sum(correct)), "n": s.n, "macro_f1": s.macro_f1, "paired_vs_first": paired,
        "per_class": [{"label": label, "precision": c.precision, "recall": c.recall, "f1": c.f1,
                       "support": c.support} for label, c in zip(row.labels, s.per_class, strict=True)],
        "confusion": s.confusion, "mean_confidence": float(probs.max(-1).mean()), "predictions": predicted,
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Path]]:
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base(args.base, device=device)
    rows = load_rows(args, base)
    classes = len(rows[0].labels)
    texts, stats = load_labelled(args.data, args.split, limit=args.limit or None, num_labels=classes)
    if stats.skipped:
        log.warning("skipped %d of %d rows: %s", sum(stats.skipped.values()), stats.rows, stats.skipped)
    if not texts:
        raise DataError(f"{args.data}: no usable {args.split} rows ({stats.rows} read, skipped {stats.skipped})")
    expected = [t.label for t in texts]
    passes: dict[PromptStyle, Features] = {}
    for row in rows:  # one base pass per prompt style, shared by every row with that style
        if row.style not in passes:
            prompts, truncated = encode_prompts([t.text for t in texts], base.tokenizer, base.n_positions, row.style)
            if truncated:
                log.warning("%s prompts: %d cut to the context's %d tokens", row.style.format, truncated,
                            base.n_positions)
            passes[row.style] = pooled_features(base, prompts, use_disk=args.cache_hidden,
                                                desc=f"base pass ({row.style.format} prompts)")
    scored: list[dict[str, Any]] = []
    for row in rows:
        first = [float(p == e) for p, e in zip(scored[0]["predictions"], expected, strict=True)] if scored else None
        scored.append(score_row(row, probabilities(row, passes[row.style], base), expected, args.seed, first))
        log.info("%s: accuracy %.3f, macro-F1 %.3f", row.name, scored[-1]["accuracy"], scored[-1]["macro_f1"])
    counts = np.bincount(expected, minlength=classes).tolist()
    report = {
        "task": "classify", "base": base.info()["base_model_name_or_path"], "base_fingerprint": base.fingerprint,
        "data": str(args.data), "split": args.split, "n_examples": len(texts), "rows_read": stats.rows,
        "rows_skipped": stats.skipped, "labels": rows[0].labels, "class_counts": counts,
        "majority_accuracy": max(counts) / len(texts), "expected": expected, "seed": args.seed, "device": device,
        "rows": scored, "references": args.references,
        "feature_passes": [{"prompt_format": s.format, "prompt_template": s.template, **f.stats()}
                           for s, f in passes.items()],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return report, write_report(report, args.out)


def _ci(row: dict[str, Any]) -> str:
    return f"{row['accuracy']:.3f} [{row['accuracy_ci_low']:.3f}, {row['accuracy_ci_high']:.3f}]"


def markdown_table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [f"| row | kind | Acc [95% CI] | Δ vs {rows[0]['name']} [95% CI] | macro-F1 | n |",
             "|---|---|---|---|---:|---:|"]
    for r in rows:
        d = r["paired_vs_first"]
        diff = "—" if d is None else f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        lines.append(f"| {r['name']} | {r['kind']} | {_ci(r)} | {diff} | {r['macro_f1']:.3f} | {r['n']} |")
    return "\n".join(lines) + "\n"


def references_table(report: dict[str, Any]) -> str:
    """Our rows and the reference numbers in one table, best first."""
    entries = [(r["accuracy"], r["name"] if r["kind"] == "base zero-shot" else f"{r['name']} ({r['kind']})", _ci(r),
                "measured here") for r in report["rows"]]
    entries += [(ref["accuracy"], ref["name"], f"{ref['accuracy']:.3f}", "reference") for ref in report["references"]]
    entries.append((report["majority_accuracy"], "majority label", f"{report['majority_accuracy']:.3f}", "the data"))
    lines = [f"| model | {report['split']} accuracy | source |", "|---|---|---|"]
    lines += [f"| {name} | {acc} | {source} |" for _, name, acc, source in sorted(entries, key=lambda e: -e[0])]
    return "\n".join(lines) + "\n"


def confusion_name(row_name: str) -> str:
    return f"confusion_{re.sub(r'[^A-Za-z0-9._-]+', '-', row_name).strip('-') or 'row'}.png"


def render_markdown(report: dict[str, Any]) -> str:
    counts = ", ".join(f"{label} {n}" for label, n in zip(report["labels"], report["class_counts"], strict=True))
    parts = [f"# Classification: {report['base']}\n",
             f"{report['n_examples']} texts from `{report['data']}` ({report['split']}; {counts}), seed "
             f"{report['seed']}.\n", markdown_table(report), "## Beside the references\n", references_table(report)]
    for r in report["rows"]:
        parts.append(f"## {r['name']}: per label\n")
        parts.append("| label | precision | recall | F1 | support |\n|---|---:|---:|---:|---:|\n" + "".join(
            f"| {c['label']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |\n"
            for c in r["per_class"]))
        parts.append(f"![confusion matrix of {r['name']}]({confusion_name(r['name'])})\n")
    parts.append(NOTES)
    return "\n".join(parts)


def plot_confusion(row: dict[str, Any]) -> bytes:
    """The confusion matrix, each true label's row shaded by its share, counts written in (Agg: no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(row["confusion"], dtype=np.float64)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.6 * len(row["labels"])
    fig = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true label")
    ticks = range(len(row["labels"]))
    ax.set_xticks(ticks, row["labels"], rotation=30, ha="right")
    ax.set_yticks(ticks, row["labels"])
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, f"{int(count)}", ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"{row['name']}: accuracy {row['accuracy']:.3f}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """report.json, report.md and one confusion PNG per row; rendered before anything is written."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"report.md": render_markdown(report).encode(),
             **{confusion_name(r["name"]): plot_confusion(r) for r in report["rows"]}}
    write_file_atomic(out / "report.json", (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    for name, content in files.items():
        write_file_atomic(out / name, content)
    return [out / "report.md", out / "report.json", *(out / n for n in files if n != "report.md")]


def main(args: argparse.Namespace) -> None:
    """training.evaluate's entry for classification (its own parser has resolved `args`)."""
    with cli.user_errors(report=args.from_json or args.out):
        if args.from_json is not None:
            report = json.loads(args.from_json.read_text())
            written = write_report(report, args.from_json.parent)
            print(f"wrote {', '.join(map(str, written))} (rendered from {args.from_json})")
            return
        report, written = run(args)
    print(markdown_table(report))
    print(references_table(report))
    print(f"wrote {', '.join(map(str, written))}: {len(report['rows'])} rows on {report['n_examples']} "
          f"{report['split']} texts")
