"""Logits -> next token: each strategy keeps exactly the tokens it should, and seeds reproduce draws."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heads.sampling import SamplingParams, make_generator, sample, top_k_filter, top_p_filter


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()  # (1, V)


def test_greedy_takes_the_argmax_of_each_row_and_reports_its_log_probability() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 0.0, 2.9]])
    ids, logprobs = sample(logits, SamplingParams(strategy="greedy", temperature=5.0))
    assert ids.tolist() == [1, 0]
    expected = F.log_softmax(logits, dim=-1)[[0, 1], [1, 0]]  # greedy ignores temperature
    assert torch.allclose(logprobs, expected)
    assert (logprobs <= 0).all()


def test_top_k_filter_keeps_exactly_the_k_largest() -> None:
    logits = torch.tensor([[0.3, -2.0, 5.0, 1.0, 4.0, 0.0]])
    kept = top_k_filter(logits, 3)
    assert torch.isfinite(kept[0]).nonzero().flatten().tolist() == [2, 3, 4]
    assert torch.equal(kept[0, [2, 3, 4]], logits[0, [2, 3, 4]])
    assert torch.isfinite(top_k_filter(logits, 100)).all()  # k past the vocabulary keeps everything


@pytest.mark.parametrize(("p", "kept"), [(0.7, [0, 1]), (0.5, [0]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3]),
                                         (1e-6, [0])])
def test_top_p_filter_keeps_the_smallest_set_reaching_p(p: float, kept: list[int]) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    order = [2, 0, 3, 1]  # the vocabulary order must not matter
    shuffled = logits_from_probs([probs[i] for i in order])
    out = top_p_filter(shuffled, p)
    survivors = sorted(order[i] for i in torch.isfinite(out[0]).nonzero().flatten().tolist())
    assert survivors == kept


def test_top_k_draws_stay_in_the_top_k_and_cover_them() -> None:
    logits = torch.tensor([[1.0, 1.2, 0.9, -3.0, 1.1, -5.0]]).repeat(500, 1)  # (500, V)
    ids, logprobs = sample(logits, SamplingParams(strategy="top_k", top_k=3), make_generator(0))
    assert set(ids.tolist()) == {0, 1, 4}
    assert torch.allclose(logprobs, F.log_softmax(logits, dim=-1).gather(-1, ids[:, None]).squeeze(-1))


def test_top_p_draws_stay_in_the_nucleus() -> None:
    logits = logits_from_probs([0.05, 0.5, 0.3, 0.15]).repeat(500, 1)
    ids, _ = sample(logits, SamplingParams(strategy="top_p", top_p=0.7), make_generator(1))
    assert set(ids.tolist()) == {1, 2}


def test_logprobs_use_the_temperature_scaled_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(strategy="top_k", top_k=4, temperature=2.0)
    ids, logprobs = sample(logits, params, make_generator(3))
    expected = F.log_softmax(logits / 2.0, dim=-1)[0, int(ids)]
    assert math.isclose(float(logprobs), float(expected), rel_tol=1e-6)


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    logits = torch.zeros(1, 50)
    params = SamplingParams(strategy="top_k", top_k=50)

    def draws(seed: int) -> list[int]:
        gen = make_generator(seed)
        return [int(sample(logits, params, gen)[0]) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_1_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, SamplingParams(strategy="top_k", top_k=1), make_generator(0))[0], greedy)
    assert torch.equal(sample(logits, SamplingParams(strategy="top_p", top_p=1e-9), make_generator(0))[0], greedy)


@pytest.mark.parametrize("params", [SamplingParams(strategy="beam"), SamplingParams(top_k=0),
                                    SamplingParams(top_p=0.0), SamplingParams(top_p=1.5),
                                    SamplingParams(temperature=0.0), SamplingParams(top_k=True)])
def test_validate_names_the_bad_field(params: SamplingParams) -> None:
    with pytest.raises(ValueError, match="strategy|top_k|top_p|temperature"):
        params.validate()
