import json
import sys

import pytest

from training.data import (
    PROMPT_TEMPLATE,
    DataError,
    Example,
    collate,
    encode,
    extract_answer,
    format_prompt,
    format_target,
    load_examples,
)


class CharTokenizer:
    """One token per character, EOS = 0: enough to check masking and truncation exactly."""

    eos_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def write_jsonl(path, rows) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


GOOD = {"problem": "1+1?", "generated_solution": "1 + 1 = 2.", "expected_answer": "2"}


def test_jsonl_rows_with_missing_empty_or_malformed_fields_are_skipped_and_counted(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [GOOD, {"problem": "x", "generated_solution": "y"}, {**GOOD, "expected_answer": "  "},
                       "{not json", "[1, 2]", {**GOOD, "problem": "2+2?"}])
    examples, stats = load_examples(str(path))
    assert [e.problem for e in examples] == ["1+1?", "2+2?"]
    assert stats.rows == 6 and stats.kept == 2
    assert stats.skipped == {"missing field": 1, "empty field": 1, "malformed row": 2}


def test_folder_uses_split_file_and_limit(tmp_path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [GOOD] * 5)
    write_jsonl(tmp_path / "test.jsonl", [{**GOOD, "problem": "t"}])
    assert len(load_examples(str(tmp_path), limit=3)[0]) == 3
    assert load_examples(str(tmp_path), split="test")[0][0].problem == "t"
    with pytest.raises(DataError, match="no validation.jsonl or validation.parquet"):
        load_examples(str(tmp_path), split="validation")


def test_parquet(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({k: [GOOD[k], ""] for k in GOOD})
    pq.write_table(table, tmp_path / "train.parquet")
    examples, stats = load_examples(str(tmp_path))
    assert examples == [Example("1+1?", "1 + 1 = 2.", "2")]
    assert stats.skipped == {"empty field": 1}


def test_missing_path_and_bad_suffix_give_clear_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_examples(str(tmp_path / "x.csv"))


def test_hub_id_without_hub_gives_one_line_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without the package
    with pytest.raises(DataError) as err:
        load_examples("nvidia/OpenMathInstruct-2")
    assert "nvidia/OpenMathInstruct-2" in str(err.value) and "\n" not in str(err.value)


def test_prompt_and_target_format() -> None:
    ex = Example("What is 2+3?", "2 + 3 = 5.", "5")
    assert format_prompt(ex.problem) == "Problem: What is 2+3?\nSolution:"
    assert format_target(ex) == " 2 + 3 = 5.\nFinal answer: 5"


def test_encode_masks_prompt_and_counts_truncation() -> None:
    tok = CharTokenizer()
    ex = Example("ab", "cd", "1")
    (ids, prompt_len), = encode([ex], tok, max_len=200)[0]
    prompt = format_prompt("ab", PROMPT_TEMPLATE)
    assert prompt_len == len(prompt)
    assert ids[-1] == 0 and "".join(map(chr, ids[prompt_len:-1])) == format_target(ex)
    input_ids, mask, labels = collate([(ids, prompt_len), (ids[:5], 2)], pad_id=0)
    assert input_ids.shape == labels.shape == (2, len(ids))
    assert (labels[0, :prompt_len] == -100).all() and (labels[0, prompt_len:] == input_ids[0, prompt_len:]).all()
    assert mask[1].sum() == 5 and (labels[1, 5:] == -100).all() and (labels[1, 2:5] == input_ids[1, 2:5]).all()

    encoded, stats = encode([ex, Example("x" * 300, "y", "1")], tok, max_len=prompt_len + 3)
    assert stats.truncated == 1 and stats.dropped == 1 and len(encoded) == 1
    assert len(encoded[0][0]) == prompt_len + 3 and stats.target_tokens == 3


@pytest.mark.parametrize("text,answer", [
    ("so 3 + 4 = 7. The answer is 7.\nFinal answer: 7", "7"),
    ("blah\nFinal answer: 1,234.", "1234"),
    ("the result is \\boxed{42} indeed", "42"),
    ("first 3 then -12.5 last", "-12.5"),
    ("3 + 4 = 7. The answer is 7.\nFal answer: 141", "7"),
    ("The answer is 7. More: the answer is 9.", "7"),
    ("no digits here", None),
])
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer
