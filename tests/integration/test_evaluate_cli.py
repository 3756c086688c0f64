"""`python -m training.evaluate` in-process on the tiny base: reports, their numbers, refusals."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

import training.data
from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import load_base
from training.evaluate import main

TIMING = ("generation_seconds", "tokens_per_s")


def _save_head(base_dir: Path, out: Path) -> str:
    base = load_base(str(base_dir))
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16, num_heads=2), vocab_size=base.vocab_size,
                                 n_embd=base.n_embd)
    save_head(head, out, base.info(), task="math", prompt_template=training.data.PROMPT_TEMPLATE)
    return base.fingerprint


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base passes each test makes are kept in its own folder, never the user's cache."""
    monkeypatch.setenv("HEADSERVE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def head_dir(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heads") / "math-ba"
    _save_head(tiny_base_dir, out)
    return out


def _run(tiny_base_dir: Path, heads: list[Path], data: Path, out: Path, *extra: str) -> dict[str, Any]:
    main(["--base", str(tiny_base_dir), "--heads", *map(str, heads), "--data", str(data), "--out", str(out),
          "--limit", "4", "--max-new-tokens", "8", "--batch-size", "3", "--seed", "5", *extra])
    return json.loads((out / "report.json").read_text())  # type: ignore[no-any-return]


def _without_timing(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in report["rows"]]


def test_report_files_and_numbers(tiny_base_dir: Path, head_dir: Path, synth_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    report = _run(tiny_base_dir, [head_dir], synth_dir, tmp_path / "a")
    for name in ("report.json", "report.md", "report.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert (tmp_path / "a" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["name"] for r in report["rows"]] == ["greedy", "top_k", "math-ba"]
    assert report["n_examples"] == 4 and report["seed"] == 5 and report["max_new_tokens"] == 8
    assert report["base_fingerprint"] == load_base(str(tiny_base_dir)).fingerprint
    for row in report["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["accuracy_ci_low"] <= row["accuracy"] <= row["accuracy_ci_high"]
        assert row["perplexity"] == pytest.approx(math.exp(row["cross_entropy"]), rel=1e-12)
        assert 0 < row["generated_tokens"] <= 4 * 8 and row["n"] == 4
        assert 0.0 <= row["token_f1"] <= 1.0 and row["n_parsed"] <= 4
        assert len(row["samples"]) == 3
        assert len(row["correct"]) == 4 and row["n_correct"] == row["correct"].count("1")
        assert 0.0 <= row["within_1pct"] <= 1.0
    assert report["sweep"] is None and len(report["reference_passes"]) == 1  # one base pass serves every row
    greedy, top_k, head = report["rows"]
    assert greedy["paired_vs_greedy"] is None
    assert (top_k["strategy"], top_k["top_k"], top_k["temperature"]) == ("top_k", 50, 1.0)
    # The fresh head decodes exactly as the base, so it is no better than greedy on any resample.
    assert head["paired_vs_greedy"] == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0, "share_better": 0.0, "n": 4}
    # A random base over a ~300-token vocabulary is near uniform: CE close to log(V), not 0 and not huge.
    assert 0.5 * math.log(300) < greedy["cross_entropy"] < 2 * math.log(300)
    assert top_k["cross_entropy"] == greedy["cross_entropy"]  # same base distribution
    # The head's residual starts at alpha=1 with a zero query: it still is the base distribution.
    assert head["cross_entropy"] == pytest.approx(greedy["cross_entropy"], abs=1e-4)
    assert [s["generated_text"] for s in head["samples"]] == [s["generated_text"] for s in greedy["samples"]]
    markdown = (tmp_path / "a" / "report.md").read_text()
    assert "| math-ba |" in markdown and "top_k" in markdown
    assert "| greedy |" in capsys.readouterr().out


def test_same_seed_gives_same_metrics(tiny_base_dir: Path, head_dir: Path, synth_dir: Path, tmp_path: Path) -> None:
    first = _run(tiny_base_dir, [head_dir], synth_dir, tmp_path / "a", "--top-k", "20")
    second = _run(tiny_base_dir, [head_dir], synth_dir, tmp_path / "b", "--top-k", "20")
    assert _without_timing(first) == _without_timing(second)


def test_base_rows_only_without_heads(tiny_base_dir: Path, synth_dir: Path, tmp_path: Path) -> None:
    report = _run(tiny_base_dir, [], synth_dir, tmp_path / "a")
    assert [r["name"] for r in report["rows"]] == ["greedy", "top_k"]


def test_head_for_another_base_exits_2(tiny_base_dir: Path, other_base_dir: Path, synth_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    other_fingerprint = _save_head(other_base_dir, tmp_path / "foreign")
    with pytest.raises(SystemExit) as exc:
        _run(tiny_base_dir, [tmp_path / "foreign"], synth_dir, tmp_path / "out")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert other_fingerprint in err and load_base(str(tiny_base_dir)).fingerprint in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_evaluate_prints_where_it_wrote_and_how_to_serve_the_heads(tiny_base_dir: Path, head_dir: Path,
                                                                  synth_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    report = _run(tiny_base_dir, [head_dir], synth_dir, tmp_path / "a")
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'a' / 'report.md'}, {tmp_path / 'a' / 'report.json'}, {tmp_path / 'a' / 'report.png'}" \
        in printed
    assert f"-m clients register {head_dir} --name math-ba" in printed
    assert "-m clients generate --head math-ba" in printed and report["rows"][2]["samples"][0]["problem"] in printed


def test_report_md_shows_every_rows_samples_and_every_error_column(tiny_base_dir: Path, head_dir: Path, synth_dir: Path,
                                                              tmp_path: Path) -> None:
    report = _run(tiny_base_dir, [head_dir], synth_dir, tmp_path / "a")
    markdown = (tmp_path / "a" / "report.md").read_text()
    assert "| MSE | RMSE | MedAE (n) | log10 err | ≤1% |" in markdown and "| Δ vs greedy [95% CI] |" in markdown
    samples = markdown.split("## Sample generations", 1)[1]
    for i, sample in enumerate(report["rows"][0]["samples"]):
        section = samples.split(f"### {i + 1}. ", 1)[1].split("\n### ", 1)[0]
        assert section.startswith(sample["problem"])
        for row in report["rows"]:
            assert row["samples"][i]["problem"] == sample["problem"]  # the same examples for every row
            assert f"\n| {row['name']} | " in section
    for row in report["rows"]:
        assert row["median_abs_error"] is None or row["median_abs_error"] >= 0
        assert (row["log10_error"] is None) == (row["n_parsed"] == 0)


def test_from_json_renders_report_md_again_without_decoding(tiny_base_dir: Path, head_dir: Path, synth_dir: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tiny_base_dir, [head_dir], synth_dir, tmp_path / "a")
    written = (tmp_path / "a" / "report.md").read_text()
    (tmp_path / "a" / "report.md").write_text("stale")
    monkeypatch.setattr("training.evaluate.load_base", None)  # anything that would decode fails loudly
    main(["--from-json", str(tmp_path / "a" / "report.json")])
    assert (tmp_path / "a" / "report.md").read_text() == written


def test_from_json_on_a_file_that_is_no_report_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "report.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit) as exc:
        main(["--from-json", str(tmp_path / "report.json")])
    assert exc.value.code == 2 and "not a report written by training.evaluate" in capsys.readouterr().err


def test_decoding_logs_no_transformers_deprecation(tiny_base_dir: Path, head_dir: Path, synth_dir: Path,
                                                   tmp_path: Path) -> None:
    """transformers 5 logs "`past_key_values` ... deprecated" once per process on the old cache keyword."""
    warn_once = getattr(logging.Logger, "warning_once", None)
    if hasattr(warn_once, "cache_clear"):
        warn_once.cache_clear()  # type: ignore[union-attr]  # so an earlier test cannot have used up the "once"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")  # it does not propagate to the root logger
    hf_logger.addHandler(handler)
    try:
        _run(tiny_base_dir, [head_dir], synth_dir, tmp_path / "a")
    finally:
        hf_logger.removeHandler(handler)
    assert [r.getMessage() for r in records if "deprecated" in r.getMessage()] == []
