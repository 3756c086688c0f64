"""The paper's second claim as a measurement: how accuracy and CE move with temperature and top-k, per row.

The seed paper says its head removes the need to tune temperature and top-k. So the base's own LM head and every
head decode the same problems at each (temperature, top-k) of a grid, and each row gets, per grid point, accuracy
with its bootstrap interval; per temperature, the teacher-forced CE of the reference (`training.reference`); per
top-k, the share of reference tokens its top-k keeps; and a summary of how far its accuracy moves over the grid
(`metrics.spread`): a head that makes decoding less sensitive has the smaller range.

T = 0 or k = 1 is greedy decoding whatever the other setting is, so every such grid point of a row shares the
row's one greedy decode (`decode_key`), which is also the main table's greedy decode on the same problems.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from training.metrics import accuracy_with_ci, exact_matches, spread
from training.reference import Curves

DecodeKey = tuple[str, int, float]  # (strategy, top_k, temperature) of one decode of a row
GREEDY: DecodeKey = ("greedy", 0, 0.0)
TEMPERATURES = (0.0, 0.3, 0.7, 1.0)
TOP_KS = (1, 10, 50)
SWEEP_LIMIT = 100  # problems decoded per grid point: the first of the evaluated ones, the same for every point


def decode_key(temperature: float, top_k: int) -> DecodeKey:
    """The decode a grid point needs: every greedy point (T = 0 or k = 1) of a row maps to one key."""
    return GREEDY if temperature == 0 or top_k == 1 else ("top_k", top_k, temperature)


def bits(matches: Sequence[bool]) -> str:
    """Per-problem correctness as one compact string ("0110"), so rows can be compared problem by problem later."""
    return "".join("1" if m else "0" for m in matches)


@dataclass(frozen=True)
class Grid:
    temperatures: tuple[float, ...] = TEMPERATURES
    top_ks: tuple[int, ...] = TOP_KS
    limit: int = SWEEP_LIMIT

    def points(self) -> list[tuple[float, int]]:
        """(temperature, top_k) in table order: top-k outer, temperature inner."""
        return [(t, k) for k in self.top_ks for t in self.temperatures]

    def keys(self) -> list[DecodeKey]:
        """The distinct decodes the grid needs per row, greedy first."""
        return list(dict.fromkeys(decode_key(t, k) for t, k in self.points()))

    @property
    def sampling_temperatures(self) -> tuple[float, ...]:
        """Temperatures a cross-entropy is defined at (T > 0)."""
        return tuple(t for t in self.temperatures if t > 0)


@dataclass(frozen=True)
class PointDecode:
    """One grid decode of one row: the predicted answers of the sweep's problems and where they came from."""

    predicted: list[str | None]
    generated_tokens: int
    source: str  # "greedy" (the row's one greedy decode), "sampled", or "<row> row" (reused from a main-table row)


def sweep_row(name: str, head_type: str, grid: Grid, decodes: Mapping[DecodeKey, PointDecode],
              expected: Sequence[str], curves: Curves, *, seed: int) -> dict[str, Any]:
    """One row of the sweep block of report.json."""
    points = []
    for temperature, top_k in grid.points():
        decoded = decodes[decode_key(temperature, top_k)]
        acc = accuracy_with_ci(decoded.predicted, expected, seed=seed)
        points.append({
            "temperature": temperature, "top_k": top_k, "decode": decoded.source,
            "accuracy": acc.accuracy, "accuracy_ci_low": acc.ci_low, "accuracy_ci_high": acc.ci_high,
            "n_correct": acc.n_correct, "n": acc.n, "correct": bits(exact_matches(decoded.predicted, expected)),
            "generated_tokens": decoded.generated_tokens,
        })
    cross_entropy = [{"temperature": t, "cross_entropy": curves.cross_entropy(t),
                      "perplexity": perplexity(curves.cross_entropy(t))} for t in grid.sampling_temperatures]
    return {"name": name, "head_type": head_type, "points": points, "cross_entropy": cross_entropy,
            "coverage": [{"top_k": k, "coverage": curves.coverage(k)} for k in grid.top_ks],
            "target_tokens": curves.n, "sensitivity": sensitivity(points, cross_entropy)}


def sensitivity(points: Sequence[Mapping[str, Any]], cross_entropy: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How far accuracy moves over the grid (and CE over temperature): the smaller, the less tuning matters.

    Over the distinct decodes of the grid: the greedy settings are one decode and count once, else the
    spread would lean towards greedy by however many greedy settings the grid happens to have.
    """
    first: dict[DecodeKey, Mapping[str, Any]] = {}
    for p in points:
        first.setdefault(decode_key(p["temperature"], p["top_k"]), p)
    distinct = list(first.values())
    acc = spread([p["accuracy"] for p in distinct])
    best = max(distinct, key=lambda p: p["accuracy"])  # the first of equals, in grid order
    worst = min(distinct, key=lambda p: p["accuracy"])
    ce = spread([c["cross_entropy"] for c in cross_entropy]) if cross_entropy else None
    return {"decodes": len(distinct), "accuracy_min": acc.minimum, "accuracy_max": acc.maximum,
            "accuracy_range": acc.range, "accuracy_std": acc.std,
            "best": {"temperature": best["temperature"], "top_k": best["top_k"]},
            "worst": {"temperature": worst["temperature"], "top_k": worst["top_k"]},
            "cross_entropy_range": ce.range if ce is not None else None}


def perplexity(cross_entropy: float) -> float:
    return math.exp(cross_entropy) if cross_entropy < 700 else math.inf
