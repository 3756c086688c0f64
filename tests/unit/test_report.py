"""report.md rendered from report.json alone: robust errors, the same sample generations for every row."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from training.report import render_markdown, rerender_markdown

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
                     log10_error=0.5),
                _row("math", [" 87 + 5 = 92. The answer is 92.\nFal", " 6 * 4 = 24."], ["92.0", "24"],
                     median_abs_error=0.0, log10_error=0.0)]}


def test_table_shows_robust_errors_not_mse() -> None:
    markdown = render_markdown(_report())
    header = next(line for line in markdown.splitlines() if line.startswith("| row |"))
    assert "MedAE (n)" in header and "log10 err" in header and "MSE" not in header
    assert "| 11.0 (2) | 0.50 |" in markdown and "| 0.0 (2) | 0.00 |" in markdown
    assert "e+64" not in markdown and "e+32" not in markdown


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


def test_rerender_writes_report_md_beside_the_json_and_leaves_the_json(tmp_path: Path) -> None:
    report_json = tmp_path / "report.json"
    report_json.write_text(json.dumps(_report()))
    before = report_json.read_bytes()
    assert rerender_markdown(report_json) == tmp_path / "report.md"
    assert (tmp_path / "report.md").read_text() == render_markdown(_report())
    assert report_json.read_bytes() == before


def test_committed_report_md_is_rendered_from_its_json() -> None:
    """reports/math/report.md is exactly what the renderer makes of reports/math/report.json."""
    folder = REPO_ROOT / "reports" / "math"
    report = json.loads((folder / "report.json").read_text())
    assert (folder / "report.md").read_text() == render_markdown(report)
    assert all(row.get("median_abs_error") is not None for row in report["rows"])
