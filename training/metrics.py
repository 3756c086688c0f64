"""Pure scoring functions for generated math solutions: no model, no I/O, numbers in and out.

Kept apart from `training.evaluate` so each metric can be checked on hand-made cases, and so the
server or a notebook can score generations the same way the evaluation CLI does.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 1000  # enough for stable 2.5/97.5 percentiles at the sizes we evaluate
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Accuracy:
    accuracy: float  # share of exact matches
    ci_low: float  # percentile bootstrap interval around it
    ci_high: float
    n_correct: int
    n: int


@dataclass(frozen=True)
class NumericErrors:
    # All None when no pair parsed: there is nothing to average.
    median_abs_error: float | None  # typical distance from the answer; a few runaway numbers cannot move it
    log10_error: float | None  # mean |slog10(p) - slog10(e)|: orders of magnitude off, 1.0 ~ a factor of ten
    mse: float | None  # kept for completeness; one runaway answer (1e32) dominates it
    rmse: float | None
    n_parsed: int  # pairs where both the prediction and the expected answer are numbers


@dataclass(frozen=True)
class PairedDifference:
    difference: float  # mean(a) - mean(b) on the same problems
    ci_low: float  # paired percentile bootstrap interval around it
    ci_high: float
    share_better: float  # share of resamples where a's mean is strictly above b's: "a is better" with this confidence
    n: int


@dataclass(frozen=True)
class Spread:
    """How much a score moves over a set of settings (the decoding sweep): less is less sensitive."""

    minimum: float
    maximum: float
    range: float  # maximum - minimum
    std: float  # population standard deviation over the settings


@dataclass(frozen=True)
class TokenPRF:
    precision: float
    recall: float
    f1: float


def parse_number(text: str | None) -> float | None:
    """A finite number from an answer string ("1,200", "$12.", "12.0", "3/4"), else None.

    Infinity and NaN are refused: they would poison a squared error without meaning anything.
    """
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    fraction = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", s)
    if fraction:
        denominator = float(fraction.group(2))
        value = float(fraction.group(1)) / denominator if denominator else math.nan
    elif re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", s):
        value = float(s)
    else:
        return None
    return value if math.isfinite(value) else None


def normalize_answer(text: str | None) -> str | None:
    """Canonical form for exact match: numbers compare by value ("12.0" == "12"), text by lowercase."""
    if text is None:
        return None
    value = parse_number(text)
    if value is None:
        return text.strip().rstrip(".").strip().lower()
    if value == int(value):
        return str(int(value))
    return repr(value)


def exact_matches(predicted: Sequence[str | None], expected: Sequence[str]) -> list[bool]:
    """Per-example match of normalised answers; a missing prediction (None) never matches."""
    _same_length(predicted, expected)
    out = []
    for p, e in zip(predicted, expected, strict=True):
        norm_p = normalize_answer(p)
        out.append(norm_p is not None and norm_p == normalize_answer(e))
    return out


def bootstrap_ci(values: Sequence[float], *, seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample examples with replacement, take quantiles.

    Why bootstrap: evaluation sets are small (hundreds), so "accuracy 0.31" alone hides whether two
    heads differ at all. A seeded numpy Generator makes the interval reproducible run to run.
    """
    return _percentiles(_bootstrap_means(values, seed, n_resamples), confidence)


def _bootstrap_means(values: Sequence[float], seed: int, n_resamples: int) -> np.ndarray:
    """(n_resamples,) means of resamples of `values` with replacement, drawn from a generator seeded with `seed`."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("a bootstrap needs at least one value")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(n_resamples, data.size))
    return data[idx].mean(axis=1)


def _percentiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, seed: int = 0,
                     n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE) -> PairedDifference:
    """mean(a) - mean(b) over the same problems, with a paired percentile bootstrap interval.

    Why paired: two rows scored on the same problems share each problem's difficulty, so resampling
    problems (both rows' scores together) gives a far tighter interval on the difference than two
    independent intervals would suggest, and answers "is a better than b, with what confidence":
    `share_better` is the share of resamples in which a's mean is strictly higher.
    """
    _same_length(a, b)
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    means = _bootstrap_means(diffs.tolist(), seed, n_resamples)
    low, high = _percentiles(means, confidence)
    return PairedDifference(difference=float(diffs.mean()), ci_low=low, ci_high=high,
                            share_better=float((means > 0).mean()), n=int(diffs.size))


def accuracy_with_ci(predicted: Sequence[str | None], expected: Sequence[str], *, seed: int = 0) -> Accuracy:
    """Exact-match accuracy of final answers with its 95% bootstrap interval."""
    matches = exact_matches(predicted, expected)
    if not matches:
        raise ValueError("accuracy needs at least one example")
    low, high = bootstrap_ci([float(m) for m in matches], seed=seed)
    return Accuracy(accuracy=sum(matches) / len(matches), ci_low=low, ci_high=high, n_correct=sum(matches),
                    n=len(matches))


def share_within(predicted: Sequence[str | None], expected: Sequence[str], *, rel: float = 0.01) -> float:
    """Share of all examples whose answer is within `rel` relative error: |p - e| <= rel * |e|.

    The robust companion of MSE that still counts every example: an unparsed prediction is not within, an
    expected answer of 0 needs exactly 0 (the bound is 0), and a non-numeric expected answer needs an exact match.
    """
    _same_length(predicted, expected)
    if not expected:
        raise ValueError("share_within needs at least one example")
    hits = 0
    for p, e in zip(predicted, expected, strict=True):
        p_value, e_value = parse_number(p), parse_number(e)
        if e_value is None:
            hits += exact_matches([p], [e])[0]
        elif p_value is not None:
            hits += abs(p_value - e_value) <= rel * abs(e_value)
    return hits / len(expected)


def spread(values: Sequence[float]) -> Spread:
    """Min, max, range and standard deviation of a score over settings."""
    if not values:
        raise ValueError("spread needs at least one value")
    data = np.asarray(values, dtype=np.float64)
    low, high = float(data.min()), float(data.max())
    return Spread(minimum=low, maximum=high, range=high - low, std=float(data.std()))


def slog10(x: float) -> float:
    """sign(x) * log10(1 + |x|): a log scale that is defined at 0 and for negative answers."""
    return math.copysign(math.log10(1.0 + abs(x)), x)


def numeric_errors(predicted: Sequence[str | None], expected: Sequence[str]) -> NumericErrors:
    """How far off the answers are, over the pairs where both sides parse as numbers.

    A generated answer can be any string of digits (`1e32` after a runaway), so the headline errors
    are robust: the median absolute error, and the mean error on a log scale (each answer counts
    by its number of digits off, not by their square). MSE/RMSE are kept for completeness.
    """
    _same_length(predicted, expected)
    pairs = []
    for p, e in zip(predicted, expected, strict=True):
        p_value, e_value = parse_number(p), parse_number(e)
        if p_value is not None and e_value is not None:
            pairs.append((p_value, e_value))
    if not pairs:
        return NumericErrors(median_abs_error=None, log10_error=None, mse=None, rmse=None, n_parsed=0)
    mse = math.fsum((p - e) * (p - e) for p, e in pairs) / len(pairs)  # `*`, not `**`: inf, not OverflowError
    return NumericErrors(median_abs_error=float(np.median([abs(p - e) for p, e in pairs])),
                         log10_error=math.fsum(abs(slog10(p) - slog10(e)) for p, e in pairs) / len(pairs),
                         mse=mse, rmse=math.sqrt(mse), n_parsed=len(pairs))


def token_prf(predicted: Sequence[Hashable], reference: Sequence[Hashable]) -> TokenPRF:
    """Bag-of-tokens overlap as in SQuAD F1: multiset intersection over each side's length.

    Both empty counts as a perfect match and one empty as none, as SQuAD does.
    """
    if not predicted or not reference:
        score = float(len(predicted) == len(reference))
        return TokenPRF(score, score, score)
    overlap = sum((Counter(predicted) & Counter(reference)).values())
    if overlap == 0:
        return TokenPRF(0.0, 0.0, 0.0)
    precision, recall = overlap / len(predicted), overlap / len(reference)
    return TokenPRF(precision, recall, 2 * precision * recall / (precision + recall))


def mean_token_prf(predicted: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> TokenPRF:
    """Per-example `token_prf`, averaged over examples (macro), on tokenizer ids.

    Tokens are the base tokenizer's ids, not whitespace words: "12." and "12" share the digit
    tokens, and every head scored on one base shares one vocabulary, so rows stay comparable.
    Callers should tokenise both sides from text the same way (not mix generated ids with a
    re-tokenised reference), so the same string always yields the same bag.
    """
    _same_length(predicted, reference)
    if not predicted:
        raise ValueError("token P/R/F1 needs at least one example")
    scores = [token_prf(p, r) for p, r in zip(predicted, reference, strict=True)]
    n = len(scores)
    return TokenPRF(precision=math.fsum(s.precision for s in scores) / n,
                    recall=math.fsum(s.recall for s in scores) / n, f1=math.fsum(s.f1 for s in scores) / n)


def _same_length(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and references differ in length: {len(a)} vs {len(b)}")
