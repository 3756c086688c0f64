"""Pure scores of label predictions: confusion matrix, per-class precision/recall/F1, macro-F1, accuracy.

No model and no I/O, so each number can be checked on hand-made cases, and training.fit (held-out rows) and
training.evaluate (dev) score classifications the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ClassScore:
    precision: float  # of the texts predicted as this label, the share that are (0.0 when none is predicted)
    recall: float  # of the texts of this label, the share predicted as it (0.0 when there are none)
    f1: float
    support: int  # texts of this label


@dataclass(frozen=True)
class Scores:
    accuracy: float
    macro_f1: float  # mean F1 over the labels that occur (as truth or as a prediction)
    per_class: list[ClassScore]
    confusion: list[list[int]]  # confusion[true][predicted]
    n: int


def confusion_matrix(predicted: Sequence[int], expected: Sequence[int], classes: int) -> list[list[int]]:
    """Counts of (true label, predicted label) pairs: rows are the truth, columns the prediction."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} labels")
    matrix = [[0] * classes for _ in range(classes)]
    for p, e in zip(predicted, expected, strict=True):
        if not (0 <= p < classes and 0 <= e < classes):
            raise ValueError(f"labels must be in [0, {classes}), got predicted {p}, expected {e}")
        matrix[e][p] += 1
    return matrix


def scores(predicted: Sequence[int], expected: Sequence[int], classes: int) -> Scores:
    """Accuracy, macro-F1 and each label's precision, recall and F1, from the confusion matrix."""
    matrix = confusion_matrix(predicted, expected, classes)
    per_class, occurring = [], []
    for c in range(classes):
        hit = matrix[c][c]
        support, chosen = sum(matrix[c]), sum(row[c] for row in matrix)
        precision = hit / chosen if chosen else 0.0
        recall = hit / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(ClassScore(precision, recall, f1, support))
        if support or chosen:
            occurring.append(f1)
    n = len(expected)
    accuracy = sum(matrix[c][c] for c in range(classes)) / n if n else 0.0
    macro = sum(occurring) / len(occurring) if occurring else 0.0
    return Scores(accuracy, macro, per_class, matrix, n)
