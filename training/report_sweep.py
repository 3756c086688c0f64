"""The decoding sweep's part of the report: markdown tables and two PNG plots, from report.json's `sweep` block alone.

Apart from `training.report` (the main table and samples) only to keep each file to one job; both render
nothing but what report.json holds, so `--from-json` redraws the sweep exactly as a fresh run would.
"""

from __future__ import annotations

import io
from typing import Any

ACCURACY_PNG = "sweep_accuracy.png"
CE_PNG = "sweep_ce.png"

NOTES = """\
How the sweep is measured:
- Every row decodes the same first {n} problems at each (temperature T, top-k) setting, sampling from the
  k highest logits divided by T, each problem with its own generator (seed {seed}), as the server samples.
- T = 0 or k = 1 is greedy decoding whatever the other setting is, so those settings share the row's one
  greedy decode, which is the main table's greedy decode on the same problems: their accuracies are equal by
  construction, not a finding. A setting equal to a main-table row's (the base at T = 1 with the `top_k`
  row's k) reuses that row's decode too (`decode` in report.json says which).
- **range** / **std**: max - min and standard deviation of accuracy over the grid's distinct decodes (the greedy
  settings count once). A row whose accuracy moves less needs less tuning of T and k: the claim under test.
- **CE at T**: teacher-forced cross-entropy of the reference tokens under softmax(logits / T) over all
  {n_all} evaluated problems; CE at T = 1 is the main table's. **top-k cover**: the share of reference tokens
  among the row's k highest logits (ties count in), i.e. how often top-k sampling can produce the reference.
"""


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _setting(point: dict[str, Any]) -> str:
    if point["temperature"] == 0 or point["top_k"] == 1:
        return "greedy"
    return f"T={point['temperature']:g}, k={point['top_k']}"


def markdown_sweep(sweep: dict[str, Any], n_all: int) -> str:
    """The sweep section of report.md: accuracy per setting, the sensitivity summary, CE and coverage."""
    temps, ks, rows = sweep["temperatures"], sweep["top_ks"], sweep["rows"]
    parts = ["## Decoding sweep: temperature x top-k\n",
             f"![accuracy against temperature, one panel per top-k]({ACCURACY_PNG})\n",
             f"![cross-entropy of the reference against temperature]({CE_PNG})\n",
             f"### Accuracy [95% CI] on the first {sweep['n_examples']} problems\n",
             "| row | top-k | " + " | ".join(f"T={t:g}" for t in temps) + " |",
             "|---|---:|" + "---|" * len(temps)]
    for row in rows:
        by_setting = {(p["temperature"], p["top_k"]): p for p in row["points"]}
        for k in ks:
            cells = [by_setting[(t, k)] for t in temps]
            parts.append(f"| {row['name']} | {k} | " + " | ".join(
                f"{_f(p['accuracy'])} [{_f(p['accuracy_ci_low'])}, {_f(p['accuracy_ci_high'])}]" for p in cells)
                + " |")
    parts += ["\n### Sensitivity to the decoding settings\n",
              "| row | decodes | min acc | max acc | range | std | best setting | worst setting | CE range over T |",
              "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for row in rows:
        s = row["sensitivity"]
        parts.append(f"| {row['name']} | {s['decodes']} | {_f(s['accuracy_min'])} | {_f(s['accuracy_max'])} | "
                     f"{_f(s['accuracy_range'])} | {_f(s['accuracy_std'])} | {_setting(s['best'])} | "
                     f"{_setting(s['worst'])} | {_f(s['cross_entropy_range'])} |")
    sampled = [c["temperature"] for c in rows[0]["cross_entropy"]] if rows else []
    parts += ["\n### The reference under each setting\n",
              "| row | " + " | ".join(f"CE at T={t:g}" for t in sampled) + " | "
              + " | ".join(f"top-{k} cover" for k in ks) + " |",
              "|---|" + "---:|" * (len(sampled) + len(ks))]
    for row in rows:
        parts.append(f"| {row['name']} | " + " | ".join(_f(c["cross_entropy"]) for c in row["cross_entropy"])
                     + " | " + " | ".join(_f(c["coverage"]) for c in row["coverage"]) + " |")
    return "\n".join(parts) + "\n\n" + NOTES.format(n=sweep["n_examples"], seed=sweep["seed"], n_all=n_all)


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plot_sweep(sweep: dict[str, Any]) -> dict[str, bytes]:
    """{file name: PNG}: accuracy against temperature (a panel per top-k, a line per row), CE against temperature."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    temps, ks, rows = sweep["temperatures"], sweep["top_ks"], sweep["rows"]
    fig = Figure(figsize=(4.0 * len(ks), 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ks), sharey=True, squeeze=False)[0]
    nudge = 0.01 * max([*temps, 1.0])  # rows side by side at each temperature, so their intervals do not overlap
    for ax, k in zip(axes, ks, strict=True):
        for i, row in enumerate(rows):
            points = sorted((p for p in row["points"] if p["top_k"] == k), key=lambda p: p["temperature"])
            shift = (i - (len(rows) - 1) / 2) * nudge
            acc = [p["accuracy"] for p in points]
            yerr = [[max(0.0, a - p["accuracy_ci_low"]) for a, p in zip(acc, points, strict=True)],
                    [max(0.0, p["accuracy_ci_high"] - a) for a, p in zip(acc, points, strict=True)]]
            ax.errorbar([p["temperature"] + shift for p in points], acc, yerr=yerr, marker="o", capsize=3,
                        label=row["name"])
        ax.set(title=f"top-k = {k}", xlabel="temperature (0: greedy)", xticks=sorted(temps), ylim=(-0.02, 1.02))
    axes[0].set_ylabel(f"accuracy, 95% CI ({sweep['n_examples']} problems)")
    axes[-1].legend(fontsize=8)
    accuracy = _png(fig)

    fig = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for row in rows:
        ax.plot([c["temperature"] for c in row["cross_entropy"]], [c["cross_entropy"] for c in row["cross_entropy"]],
                marker="o", label=row["name"])
    ax.set(xlabel="temperature", ylabel="CE of the reference (nats/token)", yscale="log",
           title="teacher-forced CE against temperature")
    ax.legend(fontsize=8)
    return {ACCURACY_PNG: accuracy, CE_PNG: _png(fig)}
