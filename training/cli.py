"""What the training CLIs share so that each tells a user the same things the same way.

Every command shows its defaults in `--help` under the name a user types (`python -m training.fit`),
and ends by saying what it wrote and which command comes next, spelled with the interpreter the
user actually ran (`.venv/bin/python` from the checkout), so the next step can be pasted as is.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring keeps its line breaks, and every option with a real default shows it.

    Options without one (required, None, an off switch) say nothing rather than "(default: None)".
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser named as the user runs it: `python -m training.fit`, not `fit.py`.

    A dispatcher that runs this module's `main` under its own name (`headserve fit` sets argv[0]) keeps it.
    """
    invoked = sys.argv[0] if sys.argv and sys.argv[0] else ""
    prog = f"python -m {module}" if not invoked or invoked.endswith(".py") else Path(invoked).name
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)


def python_command() -> str:
    """The interpreter as the user can type it here: `.venv/bin/python` when it sits below the working folder."""
    exe = Path(sys.executable)
    try:
        relative = Path(os.path.relpath(exe, Path.cwd()))
    except ValueError:  # another drive (Windows)
        return "python"
    if not relative.parts or relative.parts[0] == "..":
        return "python"
    return str(relative)


def command(module: str, *args: object) -> str:
    """A ready-to-paste shell line: `<python> -m module args...`, each argument quoted where needed."""
    return " ".join([python_command(), "-m", module] + [shlex.quote(str(a)) for a in args])


def next_steps(lines: Sequence[str]) -> str:
    """The closing block every CLI prints: what to run next, one command per line."""
    return "next:\n" + "\n".join(f"  {line}" for line in lines)
