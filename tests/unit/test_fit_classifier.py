"""The classifier loop's pieces: folding the standardisation into the head is exact, class weights are inverse
frequency with a weighted mean of 1."""

from __future__ import annotations

import pytest
import torch

from heads import ClassifierConfig, ClassifierHead
from training.fit_classifier import class_weights, fold_standardisation


@pytest.mark.parametrize("hidden_dim", [None, 6])
def test_the_folded_head_reads_raw_states_as_the_trained_one_read_standardised_ones(hidden_dim: int | None) -> None:
    torch.manual_seed(0)
    head = ClassifierHead(ClassifierConfig(["a", "b", "c"], hidden_dim=hidden_dim), vocab_size=11, n_embd=8)
    x = torch.randn(20, 8).double() * torch.linspace(0.1, 50, 8).double() + 7  # scales far apart, off-centre
    mean, std = x.mean(0), x.std(0, correction=0)
    with torch.no_grad():
        trained = head.classify(((x - mean) / std).float())
        fold_standardisation(head, mean, std)
        folded = head.classify(x.float())
    torch.testing.assert_close(folded, trained, atol=1e-4, rtol=1e-4)


def test_class_weights_are_inverse_frequency() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    weights = class_weights(labels, 4)  # label 3 never occurs: weight 0, not a division by zero
    torch.testing.assert_close(weights, torch.tensor([6 / 9, 6 / 3, 6 / 6, 0.0]))  # C = the 3 labels that occur
    assert float(weights[labels].mean()) == pytest.approx(1.0)
