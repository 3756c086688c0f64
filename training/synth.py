"""Synthetic arithmetic word problems in OpenMathInstruct-2's columns.

Why synthetic: nothing may be downloaded at run time, yet tests, the embedded base and the
`math` head need math data with the real dataset's shape (`problem`, `generated_solution`,
`expected_answer`). Every problem is assigned to the train or test *space* by a hash of its
text, so no two calls (any seeds, any sizes) can ever leak a test problem into training or
into the base model's pretraining corpus.

    python -m training.synth --out data/my-math --train 2000 --test 200 --seed 0
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from training import cli

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Leo",
         "Mia", "Ned", "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "cards",
         "shells", "stamps", "buttons", "flowers", "eggs", "toys", "beads", "candles"]
TEST_SPACE_PERCENT = 10  # share of all problem texts reserved for evaluation

Row = dict[str, str]
Template = Callable[[random.Random, int], Row]


def is_test_problem(problem: str) -> bool:
    """Deterministic split of the whole problem space, independent of seed and size."""
    digest = hashlib.sha256(problem.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < TEST_SPACE_PERCENT


def _num(rng: random.Random, difficulty: int, low: int = 1) -> int:
    # difficulty 0: single digits, 1: two digits, 2: three digits
    return rng.randint(low, (9, 99, 999)[difficulty])


def _row(problem: str, steps: list[str], answer: int) -> Row:
    solution = " ".join(steps + [f"The answer is {answer}."])
    return {"problem": problem, "generated_solution": solution, "expected_answer": str(answer)}


def _add(rng: random.Random, d: int) -> Row:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = _num(rng, d), _num(rng, d)
    return _row(f"{name} has {a} {item}. {name} buys {b} more {item}. How many {item} does {name} have now?",
                [f"{name} starts with {a} {item} and buys {b} more, so {a} + {b} = {a + b}."], a + b)


def _subtract(rng: random.Random, d: int) -> Row:
    name, friend, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    a = _num(rng, d, low=2)
    b = rng.randint(1, a)
    return _row(f"{name} had {a} {item} and gave {b} of them to {friend}. How many {item} does {name} have left?",
                [f"{name} gives away {b} of {a} {item}, so {a} - {b} = {a - b}."], a - b)


def _multiply(rng: random.Random, d: int) -> Row:
    item = rng.choice(ITEMS)
    a, b = _num(rng, min(d, 1), low=2), rng.randint(2, 9 if d < 2 else 12)
    return _row(f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?",
                [f"Each of the {a} boxes holds {b} {item}, so {a} * {b} = {a * b}."], a * b)


def _divide(rng: random.Random, d: int) -> Row:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    each, people = _num(rng, min(d, 1)), rng.randint(2, 9)
    total = each * people
    return _row(f"{name} shares {total} {item} equally among {people} friends. How many {item} does each friend get?",
                [f"{total} {item} split among {people} friends gives {total} / {people} = {each}."], each)


def _two_step(rng: random.Random, d: int) -> Row:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = _num(rng, d, low=2), _num(rng, d)
    c = rng.randint(1, a + b)
    return _row(f"{name} has {a} {item}, finds {b} more, then loses {c}. How many {item} does {name} have?",
                [f"After finding more, {name} has {a} + {b} = {a + b}.",
                 f"After losing {c}, {name} has {a + b} - {c} = {a + b - c}."], a + b - c)


def _packs(rng: random.Random, d: int) -> Row:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    packs, per, extra = rng.randint(2, 9), _num(rng, min(d, 1), low=2), _num(rng, d)
    return _row(f"{name} buys {packs} packs of {per} {item} and already had {extra}. How many {item} does {name} have?",
                [f"The packs hold {packs} * {per} = {packs * per} {item}.",
                 f"Adding the {extra} {name} had gives {packs * per} + {extra} = {packs * per + extra}."],
                packs * per + extra)


def _three_step(rng: random.Random, d: int) -> Row:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    packs, per = rng.randint(2, 9), _num(rng, min(d, 1), low=2)
    eaten = rng.randint(1, packs * per)
    more = _num(rng, d)
    total = packs * per
    return _row(f"{name} gets {packs} bags with {per} {item} each, uses {eaten} of them, then gets {more} more. "
                f"How many {item} does {name} have?",
                [f"The bags hold {packs} * {per} = {total}.",
                 f"After using {eaten}, {total} - {eaten} = {total - eaten}.",
                 f"Getting {more} more gives {total - eaten} + {more} = {total - eaten + more}."],
                total - eaten + more)


TEMPLATES: list[Template] = [_add, _subtract, _multiply, _divide, _two_step, _packs, _three_step]


def generate(n: int, seed: int, split: str, exclude: set[str] | None = None) -> list[Row]:
    """`n` distinct problems from the given split's space ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{seed}:{split}")
    seen = set(exclude or ())
    rows: list[Row] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise RuntimeError(f"could not find {n} distinct {split} problems; got {len(rows)}")
        row = rng.choice(TEMPLATES)(rng, rng.choice((0, 1, 1, 2)))
        if row["problem"] in seen or is_test_problem(row["problem"]) != (split == "test"):
            continue
        seen.add(row["problem"])
        rows.append(row)
    return rows


def arithmetic_lines(rng: random.Random, n: int, held_out: set[tuple[int, int]]) -> Iterator[str]:
    """Bare `A op B = C` lines; addition pairs in `held_out` never appear (they measure the base)."""
    for _ in range(n):
        op = rng.choice("++++--*/")
        if op == "+":
            big = rng.random() < 0.2
            a, b = rng.randint(0, 999 if big else 99), rng.randint(0, 999 if big else 99)
            if (a, b) in held_out:
                continue
            yield f"{a} + {b} = {a + b}"
        elif op == "-":
            a = rng.randint(0, 999)
            b = rng.randint(0, a)
            yield f"{a} - {b} = {a - b}"
        elif op == "*":
            a, b = rng.randint(0, 99), rng.randint(0, 12)
            yield f"{a} * {b} = {a * b}"
        else:
            b, c = rng.randint(1, 12), rng.randint(0, 99)
            yield f"{b * c} / {b} = {c}"


def write_jsonl(rows: list[Row], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("training.synth", __doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="number of training problems")
    parser.add_argument("--test", type=int, default=200, help="number of test problems")
    parser.add_argument("--seed", type=int, default=0, help="which problems are drawn (the split never depends on it)")
    args = parser.parse_args(argv)
    if args.train < 0 or args.test < 0:
        parser.error("--train and --test must be >= 0")
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(generate(args.train, args.seed, "train"), args.out / "train.jsonl")
    write_jsonl(generate(args.test, args.seed, "test"), args.out / "test.jsonl")
    name = args.out.resolve().name
    print(f"wrote {args.train} train and {args.test} test problems to {args.out / 'train.jsonl'} and "
          f"{args.out / 'test.jsonl'}")
    print(cli.next_steps([cli.command("training.fit", "--data", args.out, "--task", "math", "--out", f"runs/{name}")]))


if __name__ == "__main__":
    main()
