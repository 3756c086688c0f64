"""`make research`'s quick variant runs every step end to end: four head kinds trained, two data sets evaluated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from heads import load_head
from training import research, synth


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real GSM8K/SVAMP files where ../shared/data holds them (a quick run reads only a few rows); else
    synthetic problems in the same columns and file layout, so the pipeline is exercised on any checkout."""
    if all((research.DATA_ROOT / f).is_file() for f in ("gsm8k/train.jsonl", "gsm8k/test.jsonl",
                                                       "svamp/test.jsonl")):
        return research.DATA_ROOT
    root = tmp_path_factory.mktemp("data")
    for folder, split, n in (("gsm8k", "train", 40), ("gsm8k", "test", 8), ("svamp", "test", 8)):
        (root / folder).mkdir(exist_ok=True)
        synth.write_jsonl(synth.generate(n, 0, split), root / folder / f"{split}.jsonl")
    return root


def test_quick_research_trains_every_kind_and_reports_both_data_sets(data_root: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "research"
    research.main(["--out", str(out), "--quick", "--data-root", str(data_root)])
    base = out / research.EMBEDDED
    kinds = {}
    for name in ("ba-logits", "ba-probs", "linear", "lowrank"):
        _, meta = load_head(base / "heads" / name)
        kinds[name] = (meta.head_type, meta.config.get("weighting"), meta.training["steps"])
    assert kinds == {"ba-logits": ("backward_attention", "logits", 2), "ba-probs": ("backward_attention", "probs", 2),
                     "linear": ("linear", None, 2), "lowrank": ("lowrank", None, 2)}
    for dataset in ("gsm8k", "svamp"):
        report = json.loads((base / dataset / "report.json").read_text())
        assert [row["name"] for row in report["rows"]][-4:] == ["ba-logits", "ba-probs", "linear", "lowrank"]
        assert report["n_examples"] == 6
    sweep = json.loads((base / "gsm8k" / "report.json").read_text())["sweep"]
    assert sweep is not None
    assert {row["name"] for row in sweep["rows"]} == {"base", "ba-logits", "ba-probs", "linear", "lowrank"}
    timings = json.loads((base / "timings.json").read_text())
    assert len(timings) == 4 + 2 and all(t["seconds"] > 0 for t in timings.values())
    summary = (out / "summary.md").read_text()
    assert "## embedded, gsm8k (6 problems)" in summary and "ba-probs" in summary
    assert f"wrote {out / 'summary.md'}" in capsys.readouterr().out

    # A second run finds every step done and redoes none; a deleted report is made again, alone.
    shutil.rmtree(base / "svamp")
    research.main(["--out", str(out), "--quick", "--data-root", str(data_root)])
    assert json.loads((base / "timings.json").read_text()).keys() == timings.keys()
    assert (base / "svamp" / "report.json").is_file()


def test_missing_data_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        research.main(["--out", str(tmp_path / "r"), "--quick", "--data-root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'gsm8k' / 'train.jsonl'}: missing" in capsys.readouterr().err
