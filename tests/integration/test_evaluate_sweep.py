"""`training.evaluate --sweep` end to end on the embedded base (default_base() unless overridden) and its `math` head.

The CLI as the research driver runs it: every grid point of every row is in report.json, greedy settings are the
greedy row's own decode, the CE curve meets the main table at T = 1, nothing is decoded twice, and `--from-json`
renders report.md again byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import training.evaluate
from heads.base import EMBEDDED_BASE, REPO_ROOT
from training.evaluate import main
from training.metrics import spread

HEAD = REPO_ROOT / "registry" / "math"
TEMPERATURES, TOP_KS = [0.0, 0.3, 0.7, 1.0], [1, 10, 50]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep_run(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[tuple]]:
    """One run, shared by the tests below; every call of `generate` is recorded."""
    out = tmp_path_factory.mktemp("sweep") / "report"
    calls: list[tuple] = []
    real = training.evaluate.generate

    def recording(base: Any, prompts: Any, **kw: Any) -> Any:
        calls.append((id(kw["head"]), kw["strategy"], kw["top_k"], kw["temperature"], len(prompts)))
        return real(base, prompts, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSERVE_CACHE_DIR", str(out.parent / "cache"))
        mp.setattr(training.evaluate, "generate", recording)
        main(["--base", str(EMBEDDED_BASE), "--heads", str(HEAD), "--data", str(synth_dir), "--out", str(out),
              "--limit", "6", "--max-new-tokens", "8", "--sweep", "--sweep-limit", "4"])
    return out, json.loads((out / "report.json").read_text()), calls


def test_report_files_and_every_grid_point(sweep_run: tuple[Path, dict[str, Any], list[tuple]]) -> None:
    out, report, _ = sweep_run
    for name in ("report.md", "report.png", "sweep_accuracy.png", "sweep_ce.png"):
        assert (out / name).is_file()
    for name in ("report.png", "sweep_accuracy.png", "sweep_ce.png"):
        assert (out / name).read_bytes()[:8] == PNG
    sweep = report["sweep"]
    assert (sweep["temperatures"], sweep["top_ks"], sweep["n_examples"]) == (TEMPERATURES, TOP_KS, 4)
    assert [r["name"] for r in report["rows"]] == ["greedy", "top_k", "math"]
    assert [r["name"] for r in sweep["rows"]] == ["base", "math"]
    for row in sweep["rows"]:
        assert sorted((p["temperature"], p["top_k"]) for p in row["points"]) == \
            sorted((t, k) for t in TEMPERATURES for k in TOP_KS)
        for p in row["points"]:
            assert p["n"] == 4 and len(p["correct"]) == 4 and p["n_correct"] == p["correct"].count("1")
            assert p["accuracy"] == p["n_correct"] / 4
            assert p["accuracy_ci_low"] <= p["accuracy"] <= p["accuracy_ci_high"]
        assert [c["temperature"] for c in row["cross_entropy"]] == [0.3, 0.7, 1.0]
        coverage = [c["coverage"] for c in row["coverage"]]
        assert [c["top_k"] for c in row["coverage"]] == TOP_KS and 0 <= coverage[0] <= coverage[1] <= coverage[2] <= 1
        distinct = [p["accuracy"] for p in row["points"] if p["decode"] != "greedy"] + \
            [next(p["accuracy"] for p in row["points"] if p["decode"] == "greedy")]
        assert row["sensitivity"]["decodes"] == 7  # one greedy decode and 3 x 2 sampled settings
        assert row["sensitivity"]["accuracy_range"] == spread(distinct).range
    markdown = (out / "report.md").read_text()
    assert "## Decoding sweep" in markdown and "(sweep_accuracy.png)" in markdown and "(sweep_ce.png)" in markdown


def test_greedy_settings_are_the_greedy_rows_decode(sweep_run: tuple[Path, dict[str, Any], list[tuple]]) -> None:
    _, report, _ = sweep_run
    main_rows = {r["name"]: r for r in report["rows"]}
    for sweep_row, main_row in zip(report["sweep"]["rows"], (main_rows["greedy"], main_rows["math"]), strict=True):
        greedy = [p for p in sweep_row["points"] if p["temperature"] == 0 or p["top_k"] == 1]
        assert len(greedy) == 6 and {p["decode"] for p in greedy} == {"greedy"}
        for p in greedy:
            assert p["correct"] == main_row["correct"][:4]
            assert p["accuracy"] == main_row["correct"][:4].count("1") / 4
    # The base at T = 1, k = 50 is the top_k row's setting and seeds: its decode, reused.
    base_t1_k50 = next(p for p in report["sweep"]["rows"][0]["points"] if (p["temperature"], p["top_k"]) == (1.0, 50))
    assert base_t1_k50["decode"] == "top_k row" and base_t1_k50["correct"] == main_rows["top_k"]["correct"][:4]


def test_ce_at_temperature_one_is_the_main_tables(sweep_run: tuple[Path, dict[str, Any], list[tuple]]) -> None:
    _, report, _ = sweep_run
    main_rows = {r["name"]: r for r in report["rows"]}
    for sweep_row, main_name in zip(report["sweep"]["rows"], ("greedy", "math"), strict=True):
        at_one = next(c for c in sweep_row["cross_entropy"] if c["temperature"] == 1.0)
        assert at_one["cross_entropy"] == main_rows[main_name]["cross_entropy"]
        assert sweep_row["target_tokens"] == main_rows[main_name]["ce_target_tokens"]
    base_ce = {c["temperature"]: c["cross_entropy"] for c in report["sweep"]["rows"][0]["cross_entropy"]}
    assert base_ce[0.3] > base_ce[1.0]  # sharpening a distribution that is not sure of the reference costs


def test_nothing_is_decoded_twice(sweep_run: tuple[Path, dict[str, Any], list[tuple]]) -> None:
    _, _, calls = sweep_run
    settings = [c[:4] for c in calls]
    assert len(settings) == len(set(settings))
    # Main rows: greedy, top_k and the head's greedy on all 6 problems. Sweep: 3 temperatures x 2 k sampled per
    # row on 4 problems, less the base's (T=1, k=50), which is the top_k row's decode.
    assert sorted(c[4] for c in calls) == [4] * (6 + 5) + [6] * 3


def test_from_json_reproduces_report_md_byte_for_byte(sweep_run: tuple[Path, dict[str, Any], list[tuple]],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _, _ = sweep_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "report.json").write_bytes((out / "report.json").read_bytes())
    monkeypatch.setattr("training.evaluate.load_base", None)  # anything that would decode fails loudly
    main(["--from-json", str(copy / "report.json")])
    assert (copy / "report.md").read_bytes() == (out / "report.md").read_bytes()
    for name in ("report.png", "sweep_accuracy.png", "sweep_ce.png"):
        assert (copy / name).read_bytes()[:8] == PNG
