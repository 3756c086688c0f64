"""The evaluation report as files: report.json is the record; report.md and the PNG plots are rendered from it.

Kept apart from `training.evaluate` (which decodes and scores) so that a report can be rendered
again from its JSON alone (`python -m training.evaluate --from-json reports/math/report.json`)
when the markdown format changes, without decoding anything again. The decoding sweep's tables and
plots are `training.report_sweep`'s.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from heads.folders import write_file_atomic
from training.metrics import exact_matches
from training.report_sweep import markdown_sweep, plot_sweep

REPORT_PNG = "report.png"

NOTES = """\
How each column is measured:
- **CE**: teacher-forced cross-entropy in nats per target token (solution + final answer + EOS, prompt
  excluded), using that row's logits on the row's own prompt format. The `top_k` row reports the base
  distribution's CE, identical to `greedy`: sampling changes what is generated, not the distribution.
- **PPL**: exp(CE).
- **Acc [95% CI]**: exact match of the final answer extracted from the generated text against
  `expected_answer`, after normalising numbers (`12.0` == `12`, `1,200` == `1200`); the interval is a
  percentile bootstrap over examples (1000 resamples, seeded).
- **Δ vs greedy [95% CI]**: the row's accuracy minus the `greedy` row's on the same problems, with a paired
  bootstrap interval (problems resampled with both rows' results, 1000 resamples, seeded); **P(better)**: the
  share of those resamples in which the row is strictly more accurate than `greedy`: how sure "better" is.
- **MSE / RMSE**: of the answer, as the paper lists them, over the n examples where both the predicted and the
  expected answer parse as numbers. One runaway number (a 30-digit "answer") dominates them, so robust
  companions follow: **MedAE (n)**, the median absolute error over the same n pairs; **log10 err**, the mean of
  |slog10(predicted) - slog10(expected)| with slog10(x) = sign(x) log10(1 + |x|) (orders of magnitude off:
  1.0 is about a factor of ten); **≤1%**, the share of *all* examples whose answer is within 1% of the expected
  one (|p - e| <= 0.01 |e|: an expected 0 needs exactly 0; an unparsed answer is not within).
- **P / R / F1**: bag-of-tokens overlap (as SQuAD F1) between the generated text and the reference target,
  both tokenised by the base tokenizer, averaged over examples.
- **tok/s**: generated tokens (EOS included) / wall seconds of the batched decode; **tokens**: their total.
"""


def _fmt(value: float | None, digits: int = 3) -> str:
    """Fixed digits, or scientific notation once a value is too large to read (runaway answers)."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}e}" if abs(value) >= 1e6 else f"{value:.{digits}f}"


def _paired(row: dict[str, Any]) -> tuple[str, str]:
    """The Δ-vs-greedy and P(better) cells: none for greedy itself, n/a for a report from before they existed."""
    if "paired_vs_greedy" not in row:
        return "n/a", "n/a"
    d = row["paired_vs_greedy"]
    if d is None:
        return "—", "—"
    return f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]", f"{d['share_better']:.2f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | CE (nats/tok) | PPL | Acc [95% CI] | Δ vs greedy [95% CI] | P(better) | MSE | RMSE | MedAE (n) | "
             "log10 err | ≤1% | P | R | F1 | tok/s | tokens |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        # Reports written before a column existed have none: they show n/a, never a made-up number.
        diff, better = _paired(r)
        lines.append(
            f"| {r['name']} | {_fmt(r['cross_entropy'])} | {_fmt(r['perplexity'], 2)} | "
            f"{_fmt(r['accuracy'])} [{_fmt(r['accuracy_ci_low'])}, {_fmt(r['accuracy_ci_high'])}] | "
            f"{diff} | {better} | "
            f"{_fmt(r.get('mse'), 1)} | {_fmt(r.get('rmse'), 1)} | "
            f"{_fmt(r.get('median_abs_error'), 1)} ({r['n_parsed']}) | {_fmt(r.get('log10_error'), 2)} | "
            f"{_fmt(r.get('within_1pct'))} | "
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
              f"max {report['max_new_tokens']} new tokens.\n\n"
              f"![accuracy with its interval and perplexity, per row]({REPORT_PNG})\n\n")
    sweep = report.get("sweep")
    samples = markdown_samples(report["rows"])
    return (header + markdown_table(report["rows"]) + "\n" + NOTES
            + ("\n" + markdown_sweep(sweep, report["n_examples"]) if sweep else "")
            + ("\n" + samples if samples else ""))


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


def render_files(report: dict[str, Any]) -> dict[str, bytes]:
    """{file name: content} of everything rendered from the report: report.md and the plots."""
    files = {"report.md": render_markdown(report).encode(), REPORT_PNG: plot_png(report["rows"])}
    if report.get("sweep"):
        files.update(plot_sweep(report["sweep"]))
    return files


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """report.json, report.md and the plots into `out`; returns the paths written (report.md first)."""
    out.mkdir(parents=True, exist_ok=True)
    files = render_files(report)  # before any write: a report that cannot be rendered leaves no half report behind
    write_file_atomic(out / "report.json", (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    for name, content in files.items():
        write_file_atomic(out / name, content)
    return [out / "report.md", out / "report.json", *(out / name for name in files if name != "report.md")]


def rerender(report_json: Path) -> list[Path]:
    """report.md and the plots beside an existing report.json, rendered again from it (nothing decoded or scored)."""
    report = json.loads(report_json.read_text())
    written = []
    for name, content in render_files(report).items():
        write_file_atomic(report_json.with_name(name), content)
        written.append(report_json.with_name(name))
    return written
