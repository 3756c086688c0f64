"""The `headserve` dispatcher: every command reaches the `python -m` entry point it names, unchanged."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

import headserve
from headserve import cli

EXPECTED = {"serve", "client", "synth", "fit", "evaluate", "pretrain", "bench"}


def test_help_lists_every_command_with_its_python_m_twin(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert set(cli.COMMANDS) == EXPECTED
    for name, command in cli.COMMANDS.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        twin = "python -m " + command.module.removesuffix(".__main__").removesuffix(".run")
        assert twin in line, line


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"headserve {headserve.__version__}"
    assert headserve.__version__.count(".") == 2 and all(part.isdigit() for part in headserve.__version__.split("."))


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().err


def test_an_unknown_command_is_refused_naming_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["train"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'train'" in err and "fit" in err


def test_every_command_resolves_to_a_main() -> None:
    for name, command in cli.COMMANDS.items():
        if command.module == "server.__main__":  # imports the whole server stack; the install test runs it
            assert importlib.util.find_spec(command.module) is not None
            continue
        assert callable(cli.load_command(name)), name


def test_arguments_are_forwarded_and_argv_restored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = list(sys.argv)
    assert cli.main(["synth", "--out", str(tmp_path), "--train", "3", "--test", "2", "--seed", "1"]) == 0
    assert sys.argv == before
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"problem", "generated_solution", "expected_answer"} <= set(rows[0])
    assert "wrote 3 train and 2 test problems" in capsys.readouterr().out


def test_a_command_names_itself_headserve_in_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["synth", "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: ") and "synth" in usage
    assert "pytest" not in usage and "synth.py" not in usage  # argparse would take argv[0] for its name


def test_a_command_exit_status_is_passed_on(capsys: pytest.CaptureFixture[str]) -> None:
    # The client's `main` returns 1 when the server cannot be reached; the console script must exit with it.
    assert cli.main(["client", "--url", "http://127.0.0.1:9", "--timeout", "2", "heads"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_training_commands_without_the_train_extra_say_how_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec

    def without_matplotlib(name: str, package: str | None = None) -> object:
        return None if name == "matplotlib" else real(name, package)

    monkeypatch.setattr(cli.importlib.util, "find_spec", without_matplotlib)
    monkeypatch.delitem(sys.modules, "training.fit", raising=False)
    for command in ("fit", "evaluate"):
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"headserve {command} needs the training extras (matplotlib not installed): "
                       "pip install 'headserve[train]'")
    assert "training.fit" not in sys.modules  # refused before the module (and torch's import time) was paid
