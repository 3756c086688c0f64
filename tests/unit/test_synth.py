import json
import re

from training import synth


def test_columns_and_integer_answers() -> None:
    rows = synth.generate(200, seed=3, split="train")
    for row in rows:
        assert set(row) == {"problem", "generated_solution", "expected_answer"}
        assert re.fullmatch(r"-?\d+", row["expected_answer"])
        assert row["generated_solution"].endswith(f"The answer is {row['expected_answer']}.")


def test_solution_equations_are_correct() -> None:
    for row in synth.generate(300, seed=4, split="train"):
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", row["generated_solution"]):
            assert eval(f"{a} {op} {b}") == int(c), row  # noqa: S307 - digits and one operator only


def test_all_templates_and_steps_appear() -> None:
    rows = synth.generate(500, seed=5, split="train")
    counts = {n: sum(1 for r in rows if r["generated_solution"].count(" = ") == n) for n in (1, 2, 3)}
    assert all(v > 0 for v in counts.values()), counts
    ops = "".join(re.findall(r" ([-+*/]) \d", " ".join(r["generated_solution"] for r in rows)))
    assert set(ops) == set("+-*/")


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    assert synth.generate(50, 1, "train") == synth.generate(50, 1, "train")
    assert synth.generate(50, 1, "train") != synth.generate(50, 2, "train")


def test_train_and_test_never_share_a_problem_across_seeds() -> None:
    train = {r["problem"] for s in range(3) for r in synth.generate(400, s, "train")}
    test = {r["problem"] for s in range(3) for r in synth.generate(100, s, "test")}
    assert not train & test
    assert all(synth.is_test_problem(p) for p in test)
    assert not any(synth.is_test_problem(p) for p in train)


def test_problems_are_distinct_within_a_split() -> None:
    rows = synth.generate(1000, 0, "train")
    assert len({r["problem"] for r in rows}) == 1000


def test_held_out_addition_pairs_never_appear_in_arithmetic_lines() -> None:
    import random

    held = {(a, b) for a in range(10) for b in range(100)}
    lines = list(synth.arithmetic_lines(random.Random(0), 5000, held))
    for line in lines:
        m = re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", line)
        if m:
            assert (int(m.group(1)), int(m.group(2))) not in held


def test_cli_writes_both_files(tmp_path) -> None:
    synth.main(["--out", str(tmp_path), "--train", "30", "--test", "7", "--seed", "9"])
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(train) == 30 and len(test) == 7
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
