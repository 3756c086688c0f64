"""report.md and the plots rendered from report.json alone: every column, the sweep, the same samples for every row."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from training.report import render_markdown, rerender
from training.report_sweep import plot_sweep

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBLEMS = [("Dan has 87 buttons. Dan buys 5 more buttons. How many buttons does Dan have now?", "92"),
            ("There are 6 boxes with 4 toys in each box. How many toys are there in total?", "24")]


def _row(name: str, texts: list[str], predicted: list[str | None], **errors: Any) -> dict[str, Any]:
    return {
        "name": name, "cross_entropy": 1.0, "perplexity": 2.718, "accuracy": 0.5, "accuracy_ci_low": 0.0,
        "accuracy_ci_high": 1.0, "n_parsed": 2, "token_precision": 0.5, "token_recall": 0.5, "token_f1": 0.5,
        "tokens_per_s": 100.0, "generated_tokens": 20, "mse": 4.8e64, "rmse": 2.2e32, **errors,
        "samples": [{"problem": problem, "expected_answer": answer, "generated_text": text, "predicted_answer": p,
                     "finish_reason": "eos"} for (problem, answer), text, p in zip(PROBLEMS, texts, predicted,
                                                                                    strict=True)],
    }


def _report() -> dict[str, Any]:
    return {"base": "models/mini-gpt2", "n_examples": 2, "data": "data/x", "split": "test", "seed": 0, "top_k": 50,
            "max_new_tokens": 64, "rows": [
                _row("greedy", [" had 87 apples | more", " 6 = 7."], ["87", "7"], median_abs_error=11.0,
                     log10_error=0.5, within_1pct=0.0, paired_vs_greedy=None),
                _row("math", [" 87 + 5 = 92. The answer is 92.\nFal", " 6 * 4 = 24."], ["92.0", "24"],
                     median_abs_error=0.0, log10_error=0.0, within_1pct=1.0,
                     paired_vs_greedy={"difference": 1.0, "ci_low": 0.5, "ci_high": 1.0, "share_better": 0.975,
                                       "n": 2})]}


def test_table_shows_mse_rmse_with_their_robust_companions() -> None:
    markdown = render_markdown(_report())
    header = next(line for line in markdown.splitlines() if line.startswith("| row |"))
    for column in ("MSE", "RMSE", "MedAE (n)", "log10 err", "≤1%", "Δ vs greedy [95% CI]", "P(better)"):
        assert f"| {column} |" in header, column
    # A runaway answer's MSE is shown as the paper lists it, in scientific notation, beside the robust numbers.
    assert "| 4.8e+64 | 2.2e+32 | 11.0 (2) | 0.50 | 0.000 |" in markdown
    assert "| 4.8e+64 | 2.2e+32 | 0.0 (2) | 0.00 | 1.000 |" in markdown


def test_paired_difference_column() -> None:
    lines = render_markdown(_report()).splitlines()
    greedy = next(line for line in lines if line.startswith("| greedy |"))
    math_row = next(line for line in lines if line.startswith("| math |"))
    assert "| 0.500 [0.000, 1.000] | — | — |" in greedy  # no difference of greedy from itself
    assert "| 0.500 [0.000, 1.000] | +1.000 [+0.500, +1.000] | 0.97 |" in math_row


def test_a_report_from_before_the_paired_columns_renders_them_as_missing() -> None:
    report = copy.deepcopy(_report())
    for row in report["rows"]:
        del row["paired_vs_greedy"], row["within_1pct"]
    markdown = render_markdown(report)
    assert "| 0.500 [0.000, 1.000] | n/a | n/a |" in markdown and "| 0.50 | n/a |" in markdown


def test_every_row_shows_its_generation_for_the_same_problems() -> None:
    markdown = render_markdown(_report())
    samples = markdown.split("## Sample generations", 1)[1]
    for problem, answer in PROBLEMS:
        assert samples.count(problem) == 1
        assert f"Expected answer: **{answer}**" in samples
    section = samples.split("### 2.")[0]
    # One line per row, answers judged like the accuracy column ("92.0" == "92"), text kept whole in one cell.
    assert "| greedy | 87 ✗ | ` had 87 apples \\| more` |" in section
    assert "| math | 92.0 ✓ | ` 87 + 5 = 92. The answer is 92.⏎Fal` |" in section
    assert "| math | 24 ✓ |" in samples.split("### 2.")[1]


def test_rows_sampled_on_different_problems_are_refused() -> None:
    report = _report()
    report["rows"][1]["samples"][0]["problem"] = "something else"
    with pytest.raises(ValueError, match="same examples"):
        render_markdown(report)


def test_a_report_from_before_the_robust_errors_renders_them_as_missing() -> None:
    report = copy.deepcopy(_report())
    for row in report["rows"]:
        del row["median_abs_error"], row["log10_error"]
    assert "| n/a (2) | n/a |" in render_markdown(report)


def test_rerender_writes_report_md_and_plots_beside_the_json_and_leaves_the_json(tmp_path: Path) -> None:
    report_json = tmp_path / "report.json"
    report_json.write_text(json.dumps(_report()))
    before = report_json.read_bytes()
    assert rerender(report_json) == [tmp_path / "report.md", tmp_path / "report.png"]
    assert (tmp_path / "report.md").read_text() == render_markdown(_report())
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report_json.read_bytes() == before


def _point(t: float, k: int, acc: float) -> dict[str, Any]:
    return {"temperature": t, "top_k": k, "accuracy": acc, "accuracy_ci_low": max(0.0, acc - 0.1),
            "accuracy_ci_high": min(1.0, acc + 0.1), "decode": "greedy" if t == 0 or k == 1 else "sampled"}


def _sweep() -> dict[str, Any]:
    rows = []
    for name, greedy, sampled in (("base", 0.25, 0.125), ("math", 0.5, 0.375)):
        points = [_point(t, k, greedy if t == 0 or k == 1 else sampled) for k in (1, 10) for t in (0.0, 0.7)]
        rows.append({"name": name, "points": points,
                     "cross_entropy": [{"temperature": 0.7, "cross_entropy": 2.5}],
                     "coverage": [{"top_k": 1, "coverage": 0.6}, {"top_k": 10, "coverage": 0.9}],
                     "sensitivity": {"decodes": 2, "accuracy_min": sampled, "accuracy_max": greedy,
                                     "accuracy_range": greedy - sampled, "accuracy_std": 0.0625,
                                     "best": {"temperature": 0.0, "top_k": 1},
                                     "worst": {"temperature": 0.7, "top_k": 10}, "cross_entropy_range": 0.0}})
    return {"temperatures": [0.0, 0.7], "top_ks": [1, 10], "n_examples": 2, "seed": 0, "rows": rows}


def test_sweep_section_tables_and_plots() -> None:
    report = {**_report(), "sweep": _sweep()}
    markdown = render_markdown(report)
    section = markdown.split("## Decoding sweep", 1)[1].split("## Sample generations", 1)[0]
    assert "![accuracy against temperature, one panel per top-k](sweep_accuracy.png)" in section
    assert "(sweep_ce.png)" in section
    assert "| row | top-k | T=0 | T=0.7 |" in section
    assert "| math | 10 | 0.500 [0.400, 0.600] | 0.375 [0.275, 0.475] |" in section
    assert "| math | 2 | 0.375 | 0.500 | 0.125 | 0.062 | greedy | T=0.7, k=10 | 0.000 |" in section
    assert "| base | 2.500 | 0.600 | 0.900 |" in section
    assert markdown.index("## Decoding sweep") < markdown.index("## Sample generations")
    assert "## Decoding sweep" not in render_markdown(_report())  # a report without a sweep has no section
    plots = plot_sweep(report["sweep"])
    assert sorted(plots) == ["sweep_accuracy.png", "sweep_ce.png"]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in plots.values())


def test_committed_report_md_is_rendered_from_its_json() -> None:
    """reports/math/report.md is exactly what the renderer makes of reports/math/report.json."""
    folder = REPO_ROOT / "reports" / "math"
    report = json.loads((folder / "report.json").read_text())
    assert (folder / "report.md").read_text() == render_markdown(report)
    assert all(row.get("median_abs_error") is not None for row in report["rows"])
