"""Scoring functions on hand-made cases whose answers can be worked out on paper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    accuracy_with_ci,
    bootstrap_ci,
    exact_matches,
    mean_token_prf,
    normalize_answer,
    numeric_errors,
    paired_bootstrap,
    parse_number,
    share_within,
    spread,
    token_prf,
)


@pytest.mark.parametrize(("text", "value"), [
    ("12", 12.0), ("12.0", 12.0), ("-3.5", -3.5), ("1,200", 1200.0), ("$45.", 45.0), (" 7 ", 7.0),
    ("3/4", 0.75), ("abc", None), ("", None), (None, None), ("inf", None), ("nan", None), ("1/0", None),
    ("12 apples", None),
])
def test_parse_number(text: str | None, value: float | None) -> None:
    assert parse_number(text) == value


def test_normalize_answer_compares_numbers_by_value() -> None:
    assert normalize_answer("12.0") == normalize_answer("12") == "12"
    assert normalize_answer("0.50") == normalize_answer(".5") == "0.5"
    assert normalize_answer(" Yes. ") == "yes"
    assert normalize_answer(None) is None


def test_exact_matches() -> None:
    got = exact_matches(["12.0", "7", None, "x", "1,000"], ["12", "8", "3", "X", "1000"])
    assert got == [True, False, False, True, True]
    with pytest.raises(ValueError, match="differ in length"):
        exact_matches(["1"], ["1", "2"])


def test_bootstrap_ci_is_seeded_and_brackets_the_mean() -> None:
    values = [1.0] * 30 + [0.0] * 70
    low, high = bootstrap_ci(values, seed=3)
    assert (low, high) == bootstrap_ci(values, seed=3)
    assert (low, high) != bootstrap_ci(values, seed=4)
    assert low < 0.3 < high
    # Normal approximation: 0.3 +- 1.96 * sqrt(0.3 * 0.7 / 100) = [0.210, 0.390]; bootstrap lands close.
    assert low == pytest.approx(0.21, abs=0.03) and high == pytest.approx(0.39, abs=0.03)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)  # no spread, no interval
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_bootstrap_ci_matches_a_direct_percentile_computation() -> None:
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    rng = np.random.default_rng(11)
    means = values[rng.integers(0, 5, size=(1000, 5))].mean(axis=1)
    assert bootstrap_ci(values.tolist(), seed=11) == tuple(np.percentile(means, [2.5, 97.5]))


def test_accuracy_with_ci() -> None:
    acc = accuracy_with_ci(["1", "2", "3", "4"], ["1", "2", "0", "0"], seed=0)
    assert acc.accuracy == 0.5 and acc.n_correct == 2 and acc.n == 4
    assert acc.ci_low <= 0.5 <= acc.ci_high and acc.ci_low >= 0.0 and acc.ci_high <= 1.0
    assert acc == accuracy_with_ci(["1", "2", "3", "4"], ["1", "2", "0", "0"], seed=0)
    with pytest.raises(ValueError):
        accuracy_with_ci([], [])


def test_numeric_errors_on_known_values() -> None:
    # errors 1, -2, 3 over parseable pairs; "x" and None are skipped, so are pairs with a non-numeric expected.
    errors = numeric_errors(["11", "8", "x", None, "13", "5"], ["10", "10", "4", "4", "10", "seven"])
    assert errors.n_parsed == 3
    assert errors.mse == pytest.approx((1 + 4 + 9) / 3)
    assert errors.rmse == pytest.approx(math.sqrt(14 / 3))


def test_numeric_errors_without_parseable_answers() -> None:
    errors = numeric_errors([None, "abc"], ["1", "2"])
    assert (errors.mse, errors.rmse, errors.n_parsed) == (None, None, 0)
    assert (errors.median_abs_error, errors.log10_error) == (None, None)
    assert numeric_errors(["3"], ["3.0"]).mse == 0.0


def test_robust_errors_ignore_a_runaway_answer_that_swamps_mse() -> None:
    # Absolute errors 1, 2, 3 and one runaway of ~1e40: the median stays 2.5 while MSE is ~2.5e79.
    errors = numeric_errors(["11", "8", "13", "1" + "0" * 40], ["10", "10", "10", "10"])
    assert errors.median_abs_error == pytest.approx(2.5)
    assert errors.mse == pytest.approx(1e80 / 4, rel=1e-6)
    # log scale: |log10(12/11)|, |log10(9/11)|, |log10(14/11)| and 40 - log10(11) decades, averaged.
    expected = (math.log10(12 / 11) + math.log10(11 / 9) + math.log10(14 / 11) + math.log10((1e40 + 1) / 11)) / 4
    assert errors.log10_error == pytest.approx(expected)


def test_log10_error_handles_zero_negative_and_overflowing_answers() -> None:
    assert numeric_errors(["0"], ["0"]).log10_error == 0.0
    assert numeric_errors(["-9"], ["9"]).log10_error == pytest.approx(2.0)  # -1 decade to +1 decade
    huge = numeric_errors(["1" + "0" * 200], ["1"])  # squares past float range: MSE is inf, not an OverflowError
    assert huge.mse == math.inf and huge.log10_error == pytest.approx(200 - math.log10(2))


def test_token_prf_on_known_overlaps() -> None:
    # predicted {1,2,3,4}, reference {1,2,5}: overlap 2 -> P 2/4, R 2/3, F1 = 2PR/(P+R) = 4/7
    prf = token_prf([1, 2, 3, 4], [1, 2, 5])
    assert (prf.precision, prf.recall) == (0.5, pytest.approx(2 / 3))
    assert prf.f1 == pytest.approx(4 / 7)
    # Multisets: the reference has one 7, so a prediction of three 7s overlaps only once.
    prf = token_prf([7, 7, 7], [7, 8])
    assert (prf.precision, prf.recall, prf.f1) == (pytest.approx(1 / 3), 0.5, pytest.approx(0.4))
    assert token_prf([1, 2], [2, 1]).f1 == 1.0  # bag of tokens: order does not matter
    assert token_prf([1], [2]).f1 == 0.0
    assert token_prf([], []).f1 == 1.0 and token_prf([], [1]).f1 == 0.0 and token_prf([1], []).recall == 0.0


def test_mean_token_prf_averages_per_example() -> None:
    prf = mean_token_prf([[1, 2, 3, 4], [9]], [[1, 2, 5], [9]])
    assert prf.precision == pytest.approx((0.5 + 1) / 2)
    assert prf.recall == pytest.approx((2 / 3 + 1) / 2)
    assert prf.f1 == pytest.approx((4 / 7 + 1) / 2)
    with pytest.raises(ValueError):
        mean_token_prf([], [])


def test_paired_bootstrap_of_identical_rows_is_exactly_zero() -> None:
    row = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    diff = paired_bootstrap(row, row, seed=3)
    assert (diff.difference, diff.ci_low, diff.ci_high, diff.share_better, diff.n) == (0.0, 0.0, 0.0, 0.0, 7)


def test_paired_bootstrap_of_a_row_right_wherever_the_other_is_wrong_is_one() -> None:
    a, b = [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]  # a wins on problems 0 and 2, loses on 1 and 3
    assert paired_bootstrap(a, b).difference == 0.0
    diff = paired_bootstrap([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], seed=1)
    assert (diff.difference, diff.ci_low, diff.ci_high, diff.share_better) == (1.0, 1.0, 1.0, 1.0)
    worse = paired_bootstrap([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert (worse.difference, worse.share_better) == (-1.0, 0.0)


def test_paired_bootstrap_resamples_problems_jointly_and_is_seeded() -> None:
    # a beats b on 6 problems and loses on 2 of 40: difference +0.1, and the pairing is what the interval sees.
    a = [1.0] * 6 + [0.0] * 2 + [1.0] * 12 + [0.0] * 20
    b = [0.0] * 6 + [1.0] * 2 + [1.0] * 12 + [0.0] * 20
    diff = paired_bootstrap(a, b, seed=7)
    assert diff == paired_bootstrap(a, b, seed=7) and diff != paired_bootstrap(a, b, seed=8)
    assert diff.difference == pytest.approx(0.1)
    # The percentile interval of the resampled mean differences, drawn exactly so.
    d = np.asarray(a) - np.asarray(b)
    means = d[np.random.default_rng(7).integers(0, 40, size=(1000, 40))].mean(axis=1)
    assert (diff.ci_low, diff.ci_high) == tuple(np.percentile(means, [2.5, 97.5]))
    assert diff.share_better == float((means > 0).mean())
    # Normal approximation: P(mean > 0) ~ Phi(0.1 / sqrt(0.19 / 40)) = 0.93, less the resamples that tie at 0.
    assert 0.8 < diff.share_better < 0.95 and diff.ci_low < 0 < 0.1 < diff.ci_high
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        paired_bootstrap([], [])


def test_share_within_one_percent() -> None:
    # 100 vs 101 is within 1%; 100 vs 102 is not; 0 needs exactly 0; unparsed never counts; text needs a match.
    predicted = ["101", "102", "0", "0.001", None, "garbage", "-99.5", "yes"]
    expected = ["100", "100", "0", "0", "5", "5", "-100", "Yes"]
    assert share_within(predicted, expected) == pytest.approx(4 / 8)
    assert share_within(["1,000.0"], ["990"], rel=0.01) == 0.0  # |1000 - 990| = 10 > 9.9
    assert share_within(["1,000.0"], ["990"], rel=0.02) == 1.0
    with pytest.raises(ValueError):
        share_within([], [])


def test_spread() -> None:
    s = spread([0.2, 0.5, 0.3, 0.2])
    assert (s.minimum, s.maximum) == (0.2, 0.5) and s.range == pytest.approx(0.3)
    assert s.std == pytest.approx(float(np.std([0.2, 0.5, 0.3, 0.2])))
    assert spread([0.4]).range == 0.0
    with pytest.raises(ValueError):
        spread([])
