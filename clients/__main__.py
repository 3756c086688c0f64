"""`python -m clients`: generate, classify, register, list and delete heads on a headserve server.

    python -m clients generate --head math --compare --stop $'\n' \
        "Hana gets 4 bags with 32 apples each, uses 33 of them, then gets 10 more. How many apples does Hana have?"
    python -m clients classify --head sentiment-sst "A gorgeous, witty, seductive movie."
    python -m clients classify --label-word " positive" --label-word " negative" $'Review: Dull.\nSentiment:'
    python -m clients register registry/math --name math2 --replace
    python -m clients heads
    python -m clients delete math2

`--url` (default $HEADSERVE_URL or http://127.0.0.1:8000) and `--token` (default
$HEADSERVE_ADMIN_TOKEN) go before or after the command. Errors print one line to stderr and
exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from clients.client import DEFAULT_URL, HeadserveClient
from clients.errors import HeadserveError
from clients.types import ClassifyResult, GenerateResult, HeadSummary


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes; sub-commands get them too, without defaults that would mask the global ones."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--url", default=default(os.environ.get("HEADSERVE_URL") or DEFAULT_URL),
                        help="server URL (default: $HEADSERVE_URL or %(default)s)" if defaults else argparse.SUPPRESS)
    parser.add_argument("--token", default=default(os.environ.get("HEADSERVE_ADMIN_TOKEN")),
                        help="admin token for register/delete (default: $HEADSERVE_ADMIN_TOKEN)"
                        if defaults else argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=default(120.0),
                        help="seconds to wait for an answer (default: %(default)s)" if defaults else argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients", description="Talk to a headserve server.")
    _global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text with a head (or the base's own LM head)")
    gen.add_argument("prompt", help="a problem; the head's prompt_template wraps it unless --raw")
    gen.add_argument("--head", help="head name (default: the base's linear LM head)")
    gen.add_argument("--max-new-tokens", type=int, help="tokens to generate at most (default: the server's, 64)")
    gen.add_argument("--strategy", choices=["greedy", "top_k", "top_p"], help="how the head's tokens are chosen "
                     "(default: greedy)")
    gen.add_argument("--top-k", type=int, help="k for top_k and for the top-k comparison (default: 50)")
    gen.add_argument("--top-p", type=float, help="nucleus mass for top_p (default: 0.9)")
    gen.add_argument("--temperature", type=float, help="for the sampling strategies (default: 1.0)")
    gen.add_argument("--seed", type=int, help="same seed, same text (default: a fresh one per request)")
    gen.add_argument("--stop", action="append", help="stop string, not returned (repeatable; in bash $'\\n' is a "
                     "newline)")
    gen.add_argument("--compare", action="store_true", help="also decode with the base's linear head, greedy and top-k")
    gen.add_argument("--raw", action="store_true", help="send the prompt verbatim, without the head's template")
    gen.add_argument("--json", action="store_true", help="print the full response as JSON")
    gen.add_argument("--stream", action="store_true", help="print the answer token by token as it is generated")

    cls = commands.add_parser("classify", help="label probabilities of one or more texts")
    cls.add_argument("texts", nargs="+", metavar="text", help="a text; the head's prompt_template wraps it")
    cls.add_argument("--head", help="a classifier head, or a generative head (default: the base's LM head; both "
                     "need --label-word unless the head records its labels)")
    cls.add_argument("--label-word", action="append", dest="label_words", help="score this word's first token "
                     "(repeatable, at least two; include the leading space a plain prompt's next word has)")
    cls.add_argument("--truncate", action="store_true", help="a text past the server's prompt limit keeps its last "
                     "tokens (as training cut it) instead of being refused")
    cls.add_argument("--json", action="store_true", help="print the full response as JSON")

    reg = commands.add_parser("register", help="upload a head folder (head_config.json + head.safetensors)")
    reg.add_argument("dir")
    reg.add_argument("--name", help="name on the server (default: the folder's name)")
    reg.add_argument("--replace", action="store_true", help="overwrite a head of the same name")

    commands.add_parser("heads", help="list the server's heads")

    delete = commands.add_parser("delete", help="delete a head")
    delete.add_argument("name")

    for sub in commands.choices.values():
        _global_options(sub, defaults=False)
    return parser


def _side_by_side(columns: list[tuple[list[str], str]], width: int) -> str:
    """Columns of (header lines, text), wrapped to share `width`; newlines in the text are kept."""
    gap = " | "
    col_width = max(16, (width - len(gap) * (len(columns) - 1)) // len(columns))
    blocks = []
    for header, text in columns:
        lines = [h[:col_width] for h in header] + ["-" * col_width]
        for paragraph in text.split("\n"):
            lines += textwrap.wrap(paragraph, col_width) or [""]
        blocks.append(lines)
    height = max(len(b) for b in blocks)
    rows = [gap.join((b[i] if i < len(b) else "").ljust(col_width) for b in blocks).rstrip() for i in range(height)]
    return "\n".join(rows)


def format_comparison(result: GenerateResult, width: int) -> str:
    columns = [([f"head: {result.head}" if result.head else "base (linear head)",
                 f"{result.finish_reason}, {result.tokens} tokens"], result.text)]
    columns += [([c.decoder, f"{c.finish_reason}, {c.tokens} tokens"], c.text) for c in result.comparisons or []]
    t = result.timings
    first = "-" if t.first_token_s is None else f"{t.first_token_s:.3f} s"
    timings = (f"timings: queue {t.queue_s:.3f} s, first token {first}, total {t.total_s:.3f} s, "
               f"{t.tokens_per_s:.1f} tokens/s")
    return f"prompt: {result.prompt!r}\n\n{_side_by_side(columns, width)}\n\n{timings}"


def format_classification(result: ClassifyResult, texts: Sequence[str], bar_width: int = 30) -> str:
    """Per text: its top label and probability, then a bar per label in label order."""
    width = max(len(label) for label in result.labels)
    blocks = []
    for sent, text in zip(texts, result.results, strict=True):
        lines = [f"{sent!r} -> {text.label} ({text.probability:.3f})"]
        for label, p in text.probabilities.items():
            lines.append(f"  {label.ljust(width)}  {p:.3f}  {'#' * round(p * bar_width)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_heads(heads: Sequence[HeadSummary]) -> str:
    if not heads:
        return "no heads"
    header = ("NAME", "STATUS", "TYPE", "TASK", "BYTES", "RESIDENT", "CREATED")
    rows = [header] + [(h.name, h.status, h.type or "-", h.task or "-", str(h.bytes), "yes" if h.resident else "no",
                        h.created_at or "-") for h in heads]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    for status, title in (("incompatible", "made for another base"), ("invalid", "invalid")):
        reasons = [f"{h.name}: {h.error}" for h in heads if h.status == status and h.error]
        if reasons:
            table += f"\n\n{title} (requests for them get 409):\n" + "\n".join(reasons)
    return table


def run(args: argparse.Namespace, client: HeadserveClient) -> None:
    if args.command == "generate":
        options = dict(max_new_tokens=args.max_new_tokens, strategy=args.strategy, top_k=args.top_k, top_p=args.top_p,
                       temperature=args.temperature, seed=args.seed, stop=args.stop, compare=args.compare, raw=args.raw)
        if args.stream:
            result = _stream(client, args, options)
        else:
            result = client.generate(args.prompt, args.head, **options)
        if args.stream and not (args.json or args.compare):
            return
        if args.json:
            print(json.dumps(dataclasses.asdict(result), indent=2))
        elif args.compare:
            print(format_comparison(result, shutil.get_terminal_size().columns))
        else:
            print(result.text)
    elif args.command == "classify":
        texts = args.texts[0] if len(args.texts) == 1 else args.texts
        classified = client.classify(texts, args.head, label_words=args.label_words, truncate=args.truncate)
        print(json.dumps(dataclasses.asdict(classified), indent=2) if args.json
              else format_classification(classified, args.texts))
    elif args.command == "register":
        summary = client.register_head(args.dir, args.name, replace=args.replace)
        print(f"registered {summary.name} ({summary.type}, task {summary.task or '-'}, {summary.bytes} bytes)")
    elif args.command == "heads":
        print(format_heads(client.list_heads()))
    elif args.command == "delete":
        client.delete_head(args.name)
        print(f"deleted {args.name}")


def _stream(client: HeadserveClient, args: argparse.Namespace, options: dict[str, Any]) -> GenerateResult:
    """Print the answer's text as it arrives (unless --json); return the final result."""
    result = None
    for event in client.generate_stream(args.prompt, args.head, **options):
        if isinstance(event, GenerateResult):
            result = event
        elif event.decoder == "main" and not args.json:
            print(event.text, end="", flush=True)
    if not args.json:
        print("\n" if args.compare else "", flush=True)
    if result is None:
        raise HeadserveError("the stream ended without a result")
    return result


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with HeadserveClient(args.url, token=args.token, timeout=args.timeout) as client:
            run(args, client)
    except HeadserveError as e:
        where = f" (HTTP {e.status_code})" if e.status_code is not None else ""
        print(f"error: {_one_line(e.detail)}{where}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
