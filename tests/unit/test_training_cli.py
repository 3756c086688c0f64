"""The training CLIs' `--help`: named as a user runs them, every real default shown; next steps pasteable."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from training import cli, evaluate, fit, pretrain, synth

MAINS: dict[str, Callable[[list[str]], object]] = {
    "training.fit": fit.parse_args, "training.evaluate": evaluate.parse_args, "training.synth": synth.main,
    "training.pretrain": pretrain.main,
}
# Options whose default each --help must show (one per CLI at least, and the ones users ask about).
DEFAULTS = {
    "training.fit": ["--epochs EPOCHS       passes over the rows (default: 3; classifier: 20)",
                     "(default: 16)", "(default: backward_attention)", "(default: 64)", "(default: logits)"],
    "training.evaluate": ["(0: all; default: 200, classification: all)", "(default: 128)",
                          "(default: test; classification: dev)", "(default: 50)"],
    "training.synth": ["(default: 2000)", "(default: 200)"],
    "training.pretrain": ["(default: 2500)", "(default: 120000)"],
}


def _help(module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    monkeypatch.setattr(sys, "argv", [f"/somewhere/{module.split('.')[-1]}.py"])  # as `python -m` sets it
    monkeypatch.setenv("COLUMNS", "200")  # one line per option, so the assertions need no wrapping
    with pytest.raises(SystemExit) as exc:
        MAINS[module](["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module", sorted(MAINS))
def test_help_names_the_module_and_shows_defaults(module: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(module, monkeypatch, capsys)
    assert text.startswith(f"usage: python -m {module} ")
    assert ".py" not in text.splitlines()[0]
    for shown in DEFAULTS[module]:
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_dispatcher_keeps_its_own_name(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["headserve fit"])
    with pytest.raises(SystemExit):
        fit.parse_args(["--help"])
    assert capsys.readouterr().out.startswith("usage: headserve fit ")


def test_next_step_commands_use_the_interpreter_that_ran_and_quote_arguments(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    venv_python = tmp_path / ".venv" / "bin" / "python"
    monkeypatch.setattr(sys, "executable", str(venv_python))
    monkeypatch.chdir(tmp_path)
    line = cli.command("clients", "generate", "--head", "my-math", "Dan has 87 buttons. How many?")
    assert shlex.split(line) == [".venv/bin/python", "-m", "clients", "generate", "--head", "my-math",
                                 "Dan has 87 buttons. How many?"]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the venv is no longer below the working folder: plain `python`
    assert cli.command("training.fit").startswith("python -m training.fit")
