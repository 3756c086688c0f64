"""OpenMathInstruct-2-style rows -> teacher-forcing examples whose loss covers only the target.

Sources: a local JSONL / Parquet file, a folder holding `{split}.jsonl` or `{split}.parquet`, or a
Hugging Face dataset id (streamed with `datasets` where the hub is reachable). Bad rows are
skipped and counted, never fatal: real dumps have empty or missing fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from heads.prompts import TRAINING_PROMPT_TEMPLATE, PromptStyle
from heads.prompts import encode as encode_text

T = TypeVar("T")  # what collect_rows keeps of a row

COLUMNS = ("problem", "generated_solution", "expected_answer")
PROMPT_TEMPLATE = TRAINING_PROMPT_TEMPLATE  # owned by heads.prompts; named here for training's callers
ANSWER_PREFIX = "Final answer:"


class DataError(Exception):
    """The data source cannot be read at all (missing file, unreachable hub, wrong format)."""


@dataclass(frozen=True)
class Example:
    problem: str
    solution: str
    answer: str


@dataclass
class LoadStats:
    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def format_prompt(problem: str, template: str = PROMPT_TEMPLATE) -> str:
    """The filled template alone (plain); `heads.prompts.PromptStyle` formats for a base, chat included."""
    return PromptStyle(template).fill(problem)


def format_target(example: Example) -> str:
    """Solution plus the final answer on its own line, so answers are easy to extract."""
    return f" {example.solution.strip()}\n{ANSWER_PREFIX} {example.answer.strip()}"


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_answer(text: str) -> str | None:
    """The final answer of a generated solution, by the most explicit marker present.

    `Final answer:` (our target format), else `\\boxed{}` (OpenMathInstruct-2's), else the first
    `answer is N` (GSM8K-style, what solutions say before any trailing text), else the last number.
    """
    match = re.search(re.escape(ANSWER_PREFIX) + r"\s*(\S+)", text)
    if match:
        return match.group(1).rstrip(".").replace(",", "")
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1].strip()
    stated = re.search(r"answer is\s*(" + _NUMBER + ")", text)
    if stated:
        return stated.group(1).rstrip(".").replace(",", "")
    numbers = re.findall(_NUMBER, text)
    return numbers[-1].rstrip(".").replace(",", "") if numbers else None


def _read_jsonl(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield None  # counted as a malformed row


def _read_parquet(path: Path) -> Iterator[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for batch in pq.ParquetFile(path).iter_batches(columns=None):
        yield from batch.to_pylist()


def _read_hub(dataset_id: str, split: str) -> Iterator[Any]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset_id!r} is not a local file or folder, and reading it from the Hugging Face hub "
                        "needs the 'datasets' package (pip install 'headserve[hub]')") from None
    try:
        yield from datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all mean "cannot read it"
        raise DataError(f"cannot read {dataset_id!r} (split {split!r}) from the Hugging Face hub: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def read_rows(source: str, split: str) -> Iterator[Any]:
    """The raw rows of a split: math examples here, text/label rows for training.classify_data."""
    path = Path(source)
    if path.is_dir():
        for suffix, reader in ((".jsonl", _read_jsonl), (".parquet", _read_parquet)):
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return reader(candidate)
        raise DataError(f"{path}: no {split}.jsonl or {split}.parquet in this folder")
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        if path.suffix == ".parquet":
            return _read_parquet(path)
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        return _read_hub(source, split)
    raise DataError(f"{source}: no such file or folder")


def collect_rows(source: str, split: str, limit: int | None,
                 parse: Callable[[dict[str, Any], LoadStats], T | None]) -> tuple[list[T], LoadStats]:
    """The rows `parse` keeps (at most `limit`), counting every row read and why each other was skipped: a
    bad row is never fatal. `parse` gets each dict row and returns its item, or None after `stats.skip(...)`."""
    stats = LoadStats()
    kept: list[T] = []
    for row in read_rows(str(source), split):
        if limit is not None and len(kept) >= limit:
            break
        stats.rows += 1
        if not isinstance(row, dict):
            stats.skip("malformed row")
            continue
        item = parse(row, stats)
        if item is not None:
            kept.append(item)
    stats.kept = len(kept)
    return kept, stats


def _example(row: dict[str, Any], stats: LoadStats) -> Example | None:
    values = [row.get(c) for c in COLUMNS]
    if any(v is None for v in values):
        stats.skip("missing field")
        return None
    problem, solution, answer = (str(v).strip() for v in values)
    if not problem or not solution or not answer:
        stats.skip("empty field")
        return None
    return Example(problem, solution, answer)


def load_examples(source: str, split: str = "train", limit: int | None = None) -> tuple[list[Example], LoadStats]:
    return collect_rows(source, split, limit, _example)


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # target cut to fit the context
    dropped: int = 0  # prompt alone leaves no room for any target token
    target_tokens: int = 0


def encode(examples: Iterable[Example], tokenizer: Any, max_len: int, template: str | PromptStyle = PROMPT_TEMPLATE,
           ) -> tuple[list[tuple[list[int], int]], EncodeStats]:
    """-> [(ids, prompt_len)]: prompt then target then the token that ends an answer, cut to `max_len` tokens.

    The prompt's ids come from `heads.prompts`, as the server's do. A chat-formatted target is the
    assistant's turn: tokenised without special tokens of its own (and without the leading space a plain
    target continues its prompt with), closed by the template's end-of-turn token; a plain one (a plain
    template given as a string) is tokenised as ever, closed by EOS.
    """
    style = template if isinstance(template, PromptStyle) else PromptStyle(template)
    stats = EncodeStats()
    out: list[tuple[list[int], int]] = []
    end = list(style.end_ids(tokenizer)[:1])
    chat = style.format == "chat"
    for ex in examples:
        prompt = style.ids(ex.problem, tokenizer)
        # A chat answer is the assistant's turn: no special tokens of its own, no space continuing the prompt.
        target = encode_text(format_target(ex).lstrip(), tokenizer, "chat") if chat else \
            list(tokenizer(format_target(ex))["input_ids"])
        target += end
        if len(prompt) >= max_len:
            stats.dropped += 1
            continue
        ids = prompt + target
        if len(ids) > max_len:
            stats.truncated += 1
            ids = ids[:max_len]
        stats.examples += 1
        stats.target_tokens += len(ids) - len(prompt)
        out.append((ids, len(prompt)))
    return out, stats


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on prompt and padding."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, mask, labels
