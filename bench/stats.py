"""Small, dependency-free statistics for the benchmark (percentiles, medians, safe ratios).

Why our own percentile: we want one explicit definition (linear interpolation between closest
ranks, numpy's default) used identically for every latency the report quotes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; NaN when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be between 0 and 100, got {q}")
    data = sorted(float(v) for v in values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN instead of an exception when the denominator is 0 or NaN."""
    if denominator == 0 or math.isnan(denominator) or math.isnan(numerator):
        return math.nan
    return numerator / denominator


def throughput(tokens: int, seconds: float) -> float:
    """Generated tokens per wall-clock second."""
    return ratio(float(tokens), seconds)


def decode_rate(tokens: int, first_token_s: float | None, total_s: float) -> float:
    """Tokens/s after the first token: (tokens - 1) / (total - first), so prefill and queueing drop out."""
    if first_token_s is None or tokens < 2:
        return math.nan
    return ratio(float(tokens - 1), total_s - first_token_s)
