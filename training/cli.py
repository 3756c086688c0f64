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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


@contextmanager
def user_errors(report: Path | None = None) -> Iterator[None]:
    """Turn a user's mistake into `error: ...` and exit 2; with `report`, a KeyError means that file (or folder)
    is not a report training.evaluate wrote. What a user can put right: a missing file, rows that do not parse,
    a head made for another base (imported here, so that a CLI's --help does not load torch)."""
    from heads.errors import BaseModelError, HeadError
    from training.data import DataError

    try:
        yield
    except (BaseModelError, DataError, HeadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyError as e:
        if report is None:
            raise
        print(f"error: {report}: not a report written by training.evaluate (no {e})", file=sys.stderr)
        raise SystemExit(2) from None
