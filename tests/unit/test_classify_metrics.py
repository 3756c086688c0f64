"""Classification scores on hand-made predictions, numbers worked out by hand."""

from __future__ import annotations

import pytest

from training.classify_metrics import confusion_matrix, scores


def test_scores_of_a_small_case() -> None:
    expected = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]
    s = scores(predicted, expected, 4)  # label 3 never occurs: it does not enter macro-F1
    assert s.confusion == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert s.accuracy == pytest.approx(4 / 6) and s.n == 6
    p0, p1, p2, p3 = s.per_class
    assert (p0.precision, p0.recall, p0.support) == (1.0, pytest.approx(2 / 3), 3)
    assert (p1.precision, p1.recall) == (0.5, 0.5) and p1.f1 == pytest.approx(0.5)
    assert (p2.precision, p2.recall) == (0.5, 1.0) and p2.f1 == pytest.approx(2 / 3)
    assert (p3.precision, p3.recall, p3.f1, p3.support) == (0.0, 0.0, 0.0, 0)
    assert s.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_a_label_never_predicted_scores_zero_precision_not_an_error() -> None:
    s = scores([0, 0, 0], [0, 1, 1], 2)
    assert s.per_class[1].precision == 0.0 and s.per_class[1].recall == 0.0
    assert s.macro_f1 == pytest.approx((0.5 + 0.0) / 2)


def test_labels_out_of_range_and_length_mismatch_are_refused() -> None:
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        confusion_matrix([2], [0], 2)
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        confusion_matrix([0, 1], [0], 2)
