"""Text/label rows (`{"text": ..., "label": 3}`) for classification heads, and how their prompts are encoded.

Sources as for math (training.data): a JSONL/Parquet file, or a folder holding `{split}.jsonl` (SST and CFIMDB
in ../shared/data). Bad rows (no text, a label that is no integer in range) are skipped and counted, never
fatal. A text becomes a prompt through the head's prompt style (heads.prompts, chat-formatted on a chat base),
by default `Review: {problem}\\nSentiment:`: a classifier reads the base's states over that prompt, and a
verbalizer (`Verbalizer`) is trained, with the generative path of training.fit, to answer it with its label's
word.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from heads.classifier import check_labels, verbalizer_ids
from heads.prompts import PromptStyle
from training.data import DataError, EncodeStats, Example, LoadStats, collect_rows

CLASSIFY_TEMPLATE = "Review: {problem}\nSentiment:"  # what classification heads are trained with unless told


@dataclass(frozen=True)
class Labelled:
    text: str
    label: int  # index into the label names


def load_labelled(source: str, split: str = "train", limit: int | None = None,
                  num_labels: int | None = None) -> tuple[list[Labelled], LoadStats]:
    """The rows with a non-empty text and an integer label (in [0, num_labels) when that is known)."""
    def labelled(row: dict[str, Any], stats: LoadStats) -> Labelled | None:
        text, label = row.get("text"), row.get("label")
        if text is None or label is None:
            stats.skip("missing field")
        elif not isinstance(text, str) or not text.strip():
            stats.skip("empty text")
        elif not isinstance(label, int) or isinstance(label, bool) or label < 0:
            stats.skip("label not a non-negative integer")
        elif num_labels is not None and label >= num_labels:
            stats.skip("label out of range")
        else:
            return Labelled(text.strip(), label)
        return None

    return collect_rows(source, split, limit, labelled)


def split_list(arg: str, what: str) -> list[str]:
    """A comma-separated flag value, items as written (a label word's leading space matters)."""
    items = arg.split(",")
    if any(not item.strip() for item in items):
        raise ValueError(f"{what}: empty item in {arg!r} (separate items with commas)")
    return items


def label_names(arg: str | None, rows: Sequence[Labelled], words: Sequence[str] | None = None) -> list[str]:
    """The label names: `--labels` (comma-separated), else the label words stripped, else label_0 .. label_{max}
    from the largest label in the data. ValueError if they are not 2 to 1000 distinct names."""
    if arg is not None:
        names = [item.strip() for item in split_list(arg, "--labels")]
    elif words is not None:
        names = [w.strip() for w in words]
    else:
        if not rows:
            raise DataError("no labelled rows to take label names from")
        names = [f"label_{i}" for i in range(max(r.label for r in rows) + 1)]
    if words is not None and len(names) != len(words):
        raise ValueError(f"{len(names)} label names for {len(words)} label words")
    return check_labels(names, "label names")


def truncate_prompt(ids: list[int], budget: int) -> tuple[list[int], bool]:
    """A prompt cut to its last `budget` tokens (the template's end, which the head reads last, survives)."""
    return (ids[-budget:], True) if len(ids) > budget else (ids, False)


def encode_prompts(texts: Iterable[str], tokenizer: Any, max_len: int, style: PromptStyle,
                   ) -> tuple[list[list[int]], int]:
    """Each text's prompt ids as the server forms them (heads.prompts) and how many were cut to `max_len`."""
    out, truncated = [], 0
    for text in texts:
        ids, cut = truncate_prompt(style.ids(text, tokenizer), max_len)
        out.append(ids)
        truncated += cut
    return out, truncated


@dataclass(frozen=True)
class Verbalizer:
    """Text/label rows as the generative path of training.fit trains on them: prompt = the text in the head's
    style, target = its label's word (and the answer's end token); the head records names and first tokens."""

    words: tuple[str, ...]  # per label, the word a head answers with (" terrible" ... " great")
    names: tuple[str, ...]  # per label, its name

    def load(self, source: str, split: str = "train", limit: int | None = None) -> tuple[list[Example], LoadStats]:
        """The rows as examples: problem = text, solution = the label's word, answer = the label's index."""
        rows, stats = load_labelled(source, split, limit, num_labels=len(self.words))
        return [Example(r.text, self.words[r.label], str(r.label)) for r in rows], stats

    def encode(self, examples: Iterable[Example], tokenizer: Any, max_len: int, style: PromptStyle | str,
               ) -> tuple[list[tuple[list[int], int]], EncodeStats]:
        """-> [(ids, prompt_len)] as training.data.encode gives them: prompt, the word's tokens, the end token.
        A prompt too long is cut from its start (its end is where the answer follows)."""
        style = style if isinstance(style, PromptStyle) else PromptStyle(style)
        targets = dict(zip(self.words, verbalizer_ids(self.words, tokenizer, style.format), strict=True))
        end = list(style.end_ids(tokenizer)[:1])
        stats, out = EncodeStats(), []
        for ex in examples:
            target = targets[ex.solution] + end
            prompt, cut = truncate_prompt(style.ids(ex.problem, tokenizer), max(1, max_len - len(target)))
            stats.truncated += cut
            stats.examples += 1
            stats.target_tokens += len(target)
            out.append(((prompt + target)[:max_len], len(prompt)))  # a target past a tiny context is cut
        return out, stats

    def metadata(self, tokenizer: Any, style: PromptStyle) -> dict[str, list[Any]]:
        """save_head's `labels` and `label_token_ids`: the names and each word's first token in this style."""
        ids = verbalizer_ids(self.words, tokenizer, style.format)
        return {"labels": list(self.names), "label_token_ids": [word_ids[0] for word_ids in ids]}


def verbalizer(label_words: str | None, labels: str | None) -> Verbalizer | None:
    """The verbalizer `--label-words` (and `--labels`) describe; None without label words."""
    if label_words is None:
        return None
    words = split_list(label_words, "--label-words")
    if len(set(words)) != len(words):
        raise ValueError(f"--label-words must be distinct, got {words}")
    return Verbalizer(tuple(words), tuple(label_names(labels, [], words)))
