"""The `headserve` command: one entry point that forwards to each part's own `python -m` CLI.

Each command is the existing `main(argv)` of a module (`headserve serve` is `python -m server`,
`headserve fit` is `python -m training.fit`, ...), so the two spellings can never drift apart: the
dispatcher only picks the module, imports it on demand and hands it the rest of the arguments.
Importing on demand keeps `headserve --version` and `--help` instant (no torch), and lets a serving
install without the training extras say which extra a training command needs instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from headserve import __version__

TRAINING = ("matplotlib", "tqdm")  # what `fit` and `evaluate` import beyond the serving dependencies


@dataclass(frozen=True)
class Command:
    module: str  # the module whose `main(argv)` runs the command
    summary: str  # one line for `headserve --help`
    requires: tuple[str, ...] = ()  # modules of the `train` extra it needs, checked before a long run starts


COMMANDS: dict[str, Command] = {
    "serve": Command("server.__main__", "start the HTTP server (python -m server)"),
    "client": Command("clients.__main__", "talk to a running server: generate, heads, register, delete "
                                          "(python -m clients)"),
    "synth": Command("training.synth", "write a synthetic math data set (python -m training.synth)"),
    "fit": Command("training.fit", "train one head on the frozen base (python -m training.fit)", TRAINING),
    "evaluate": Command("training.evaluate", "compare heads with the base's own decoding "
                                             "(python -m training.evaluate)", TRAINING),
    "pretrain": Command("training.pretrain", "train a small base from scratch, as the embedded one was "
                                             "(python -m training.pretrain)"),
    "bench": Command("bench.run", "benchmark the server against its own baselines (python -m bench)"),
}


def build_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="headserve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve one frozen GPT-2 with small trained output heads swapped per request.",
        epilog=f"commands:\n{listing}\n\nRun 'headserve COMMAND --help' for the options of one command.")
    parser.add_argument("--version", action="version", version=f"headserve {__version__}")
    parser.add_argument("command", metavar="COMMAND", choices=sorted(COMMANDS), nargs="?",
                        help="a command from the list below")
    parser.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER, help="the command's own arguments")
    return parser


def load_command(name: str) -> Callable[[list[str]], object]:
    """The command's `main`, imported now. A serving install lacks the training extras: say so in one line
    up front, rather than after a training run that fails when it plots its loss curve."""
    command = COMMANDS[name]
    missing = [module for module in command.requires if importlib.util.find_spec(module) is None]
    if missing:
        print(f"headserve {name} needs the training extras ({', '.join(missing)} not installed): "
              "pip install 'headserve[train]'", file=sys.stderr)
        raise SystemExit(2)
    main: Callable[[list[str]], object] = importlib.import_module(command.module).main
    return main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    run = load_command(args.command)
    # argparse names a command after argv[0] unless told otherwise: make `--help` say `headserve fit`.
    saved, sys.argv = sys.argv, [f"headserve {args.command}", *args.args]
    try:
        result = run(list(args.args))
    finally:
        sys.argv = saved
    return result if isinstance(result, int) else 0
