"""Text/label rows: bad rows skipped and counted, label names from the flag, the words or the data, prompts cut
from their start, and the verbalizer's prompt/target pairs and recorded token ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from heads.prompts import PromptStyle
from training.classify_data import (
    CLASSIFY_TEMPLATE,
    Labelled,
    encode_prompts,
    label_names,
    load_labelled,
    split_list,
    verbalizer,
)
from training.data import DataError

ROWS: list[Any] = [
    {"text": " Good film. ", "label": 1}, {"text": "Bad film.", "label": 0}, "not an object", {"text": "x"},
    {"label": 1}, {"text": "   ", "label": 0}, {"text": "y", "label": True}, {"text": "y", "label": -1},
    {"text": "y", "label": "1"}, {"text": "y", "label": 1.0}, {"text": "Fine.", "label": 4},
]


def write(path: Path, rows: list[Any], extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    write(tmp_path / "data" / "dev.jsonl", ROWS, "{broken json\n")
    rows, stats = load_labelled(str(tmp_path / "data"), "dev")
    assert rows == [Labelled("Good film.", 1), Labelled("Bad film.", 0), Labelled("Fine.", 4)]
    assert stats.rows == len(ROWS) + 1 and stats.kept == 3
    assert stats.skipped == {"malformed row": 2, "missing field": 2, "empty text": 1,
                             "label not a non-negative integer": 4}
    in_range, stats = load_labelled(str(tmp_path / "data" / "dev.jsonl"), num_labels=2)  # a file: its split is moot
    assert [r.label for r in in_range] == [1, 0] and stats.skipped["label out of range"] == 1
    assert len(load_labelled(str(tmp_path / "data"), "dev", limit=1)[0]) == 1
    with pytest.raises(DataError, match="no train.jsonl"):
        load_labelled(str(tmp_path / "data"), "train")


def test_label_names_from_the_flag_the_words_or_the_data() -> None:
    rows = [Labelled("a", 0), Labelled("b", 3)]
    assert label_names(None, rows) == ["label_0", "label_1", "label_2", "label_3"]
    assert label_names("very-negative, negative,neutral ,positive", rows) == [
        "very-negative", "negative", "neutral", "positive"]
    assert label_names(None, [], [" bad", " good"]) == ["bad", "good"]
    with pytest.raises(ValueError, match="must be distinct"):
        label_names("a,a", rows)
    with pytest.raises(ValueError, match="3 label names for 2 label words"):
        label_names("a,b,c", [], [" x", " y"])
    with pytest.raises(ValueError, match="empty item"):
        label_names("a,,b", rows)
    with pytest.raises(DataError, match="no labelled rows"):
        label_names(None, [])


def test_label_words_keep_their_leading_spaces() -> None:
    assert split_list(" very bad, bad,good", "--label-words") == [" very bad", " bad", "good"]


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_base_dir)


def test_prompts_are_the_servers_and_long_ones_lose_their_start(tokenizer: Any) -> None:
    style = PromptStyle(CLASSIFY_TEMPLATE)
    text = " ".join(["word"] * 200)
    (short, long), truncated = encode_prompts(["Nice.", text], tokenizer, 32, style)
    assert short == style.ids("Nice.", tokenizer) and truncated == 1
    assert long == style.ids(text, tokenizer)[-32:] and tokenizer.decode(long).endswith("\nSentiment:")


def test_a_verbalizer_trains_each_text_to_answer_with_its_labels_word(tokenizer: Any, tmp_path: Path) -> None:
    write(tmp_path / "train.jsonl", [{"text": "Nice.", "label": 1}, {"text": "Awful.", "label": 0},
                                     {"text": "Odd.", "label": 2}])
    words = verbalizer(" bad, good", None)
    assert words is not None and words.names == ("bad", "good")
    examples, stats = words.load(str(tmp_path / "train.jsonl"))
    assert [(e.problem, e.solution) for e in examples] == [("Nice.", " good"), ("Awful.", " bad")]
    assert stats.skipped == {"label out of range": 1}
    style = PromptStyle(CLASSIFY_TEMPLATE)
    encoded, enc = words.encode(examples, tokenizer, 256, style)
    good = tokenizer(" good", add_special_tokens=False)["input_ids"]
    ids, prompt_len = encoded[0]
    assert ids[:prompt_len] == style.ids("Nice.", tokenizer)
    assert ids[prompt_len:] == good + [tokenizer.eos_token_id]  # the word, then the answer's end
    assert enc.examples == 2 and enc.truncated == 0
    bad = tokenizer(" bad", add_special_tokens=False)["input_ids"]
    assert words.metadata(tokenizer, style) == {"labels": ["bad", "good"], "label_token_ids": [bad[0], good[0]]}
    assert verbalizer(None, "a,b") is None
    with pytest.raises(ValueError, match="must be distinct"):
        verbalizer(" bad, bad", None)
