"""`training.fit --prompt-format` records how prompts were formatted, and `training.evaluate` formats the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heads import read_metadata
from tests.chat_base import make_chat_base
from training import evaluate, fit
from training.data import PROMPT_TEMPLATE


@pytest.fixture(scope="module")
def chat_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_base(tmp_path_factory.mktemp("chat-base") / "base")


def run_fit(base_dir: Path, data_dir: Path, out: Path, *extra: str) -> None:
    fit.main(["--base", str(base_dir), "--data", str(data_dir), "--task", "math", "--out", str(out),
              "--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--eval-every", "0", "--limit", "16", *extra])


def test_auto_formats_for_chat_on_a_chat_base_and_evaluate_follows(chat_base_dir: Path, synth_dir: Path,
                                                                    tmp_path: Path) -> None:
    run_fit(chat_base_dir, synth_dir, tmp_path / "chat")
    meta = read_metadata(tmp_path / "chat")
    assert (meta.prompt_format, meta.prompt_template) == ("chat", "{problem}")
    evaluate.main(["--base", str(chat_base_dir), "--heads", str(tmp_path / "chat"), "--data", str(synth_dir),
                   "--out", str(tmp_path / "report"), "--limit", "2", "--max-new-tokens", "4"])
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert [(r["prompt_format"], r["prompt_template"]) for r in rows] == [("chat", "{problem}")] * 3


def test_plain_stays_the_default_on_a_plain_base_and_can_be_chosen_on_a_chat_base(
        tiny_base_dir: Path, chat_base_dir: Path, synth_dir: Path, tmp_path: Path) -> None:
    run_fit(tiny_base_dir, synth_dir, tmp_path / "plain")
    meta = read_metadata(tmp_path / "plain")
    assert (meta.prompt_format, meta.prompt_template) == ("plain", PROMPT_TEMPLATE)
    run_fit(chat_base_dir, synth_dir, tmp_path / "forced", "--prompt-format", "plain",
            "--prompt-template", "Q: {problem}")
    meta = read_metadata(tmp_path / "forced")
    assert (meta.prompt_format, meta.prompt_template) == ("plain", "Q: {problem}")


def test_chat_on_a_base_without_a_chat_template_is_refused(tiny_base_dir: Path, synth_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_fit(tiny_base_dir, synth_dir, tmp_path / "no", "--prompt-format", "chat")
    assert exit_.value.code == 2 and "no chat template" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
