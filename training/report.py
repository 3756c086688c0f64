"""The evaluation report as files: report.json is the record, report.md and report.png are rendered from it.

Kept apart from `training.evaluate` (which decodes and scores) so that a report can be rendered
again from its JSON alone (`python -m training.evaluate --from-json reports/math/report.json`)
when the markdown format changes, without decoding anything again.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from heads.folders import write_file_atomic
from training.metrics import exact_matches

NOTES = """\
How each column is measured:
- **CE**: teacher-forced cross-entropy in nats per target token (solution + final answer + EOS, prompt
  excluded), using that row's logits on the row's own prompt format. The `top_k` row reports the base
  distribution's CE, identical to `greedy`: sampling changes what is generated, not the distribution.
- **PPL**: exp(CE).
- **Acc [95% CI]**: exact match of the final answer extracted from the generated text against
  `expected_answer`, after normalising numbers (`12.0` == `12`, `1,200` == `1200`); the interval is a
  percentile bootstrap over examples (1000 resamples, seeded).
- **MedAE (n)**: median absolute error of the answer over the n examples where both the predicted and
  the expected answer parse as numbers. **log10 err**: the mean of |slog10(predicted) - slog10(expected)|
  with slog10(x) = sign(x) log10(1 + |x|) over the same pairs: how many orders of magnitude off an answer
  is on average (1.0 is about a factor of ten). Both are robust to the runaway numbers a model can emit
  (a 30-digit "answer"), which dominate MSE/RMSE; those stay in report.json (`mse`, `rmse`).
- **P / R / F1**: bag-of-tokens overlap (as SQuAD F1) between the generated text and the reference target,
  both tokenised by the base tokenizer, averaged over examples.
- **tok/s**: generated tokens (EOS included) / wall seconds of the batched decode; **tokens**: their total.
"""


def _fmt(value: float | None, digits: int = 3) -> str:
    """Fixed digits, or scientific notation once a value is too large to read (runaway answers)."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}e}" if abs(value) >= 1e6 else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | CE (nats/tok) | PPL | Acc [95% CI] | MedAE (n) | log10 err | P | R | F1 | tok/s | tokens |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        # Reports written before the robust errors existed have none: they show n/a, never a made-up number.
        lines.append(
            f"| {r['name']} | {_fmt(r['cross_entropy'])} | {_fmt(r['perplexity'], 2)} | "
            f"{_fmt(r['accuracy'])} [{_fmt(r['accuracy_ci_low'])}, {_fmt(r['accuracy_ci_high'])}] | "
            f"{_fmt(r.get('median_abs_error'), 1)} ({r['n_parsed']}) | {_fmt(r.get('log10_error'), 2)} | "
            f"{_fmt(r['token_precision'])} | {_fmt(r['token_recall'])} | {_fmt(r['token_f1'])} | "
            f"{r['tokens_per_s']:.1f} | {r['generated_tokens']} |")
    return "\n".join(lines) + "\n"


def _code(text: str) -> str:
    """Text as one markdown table cell: a code span (no emphasis from `*`), newlines shown as ⏎, pipes escaped."""
    text = text.replace("\n", "⏎").replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def markdown_samples(rows: list[dict[str, Any]]) -> str:
    """The same examples for every row, side by side: what each decoder actually wrote for one problem."""
    if not rows or not rows[0].get("samples"):
        return ""
    parts = ["## Sample generations\n",
             "The first examples of the set, decoded by every row (⏎ marks a newline in the generated text).\n"]
    for i, first in enumerate(rows[0]["samples"]):
        parts.append(f"\n### {i + 1}. {first['problem']}\n\nExpected answer: **{first['expected_answer']}**\n\n"
                     "| row | answer | generated text |\n|---|---|---|")
        for row in rows:
            samples = row.get("samples") or []
            if i >= len(samples) or samples[i]["problem"] != first["problem"]:
                raise ValueError(f"row {row['name']!r} has no sample {i + 1} for {first['problem']!r}: "
                                 "every row must be sampled on the same examples")
            sample = samples[i]
            predicted = sample["predicted_answer"]
            mark = "✓" if exact_matches([predicted], [first["expected_answer"]])[0] else "✗"
            parts.append(f"| {row['name']} | {predicted if predicted is not None else '—'} {mark} | "
                         f"{_code(sample['generated_text'])} |")
    return "\n".join(parts) + "\n"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md from report.json's content alone."""
    header = (f"# Evaluation: {report['base']}\n\n{report['n_examples']} examples from `{report['data']}` "
              f"({report['split']}), seed {report['seed']}, top-k {report['top_k']}, "
              f"max {report['max_new_tokens']} new tokens.\n\n")
    samples = markdown_samples(report["rows"])
    return header + markdown_table(report["rows"]) + "\n" + NOTES + ("\n" + samples if samples else "")


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


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """report.json, report.md and report.png into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    write_file_atomic(paths[0], (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    write_file_atomic(paths[1], render_markdown(report).encode())
    write_file_atomic(paths[2], plot_png(report["rows"]))
    return paths


def rerender_markdown(report_json: Path) -> Path:
    """report.md beside an existing report.json, rendered again from it (nothing is decoded or scored)."""
    report = json.loads(report_json.read_text())
    path = report_json.with_name("report.md")
    write_file_atomic(path, render_markdown(report).encode())
    return path
