"""Logits -> next token: each strategy keeps exactly the tokens it should, and seeds reproduce draws."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heads.sampling import (
    TEMPERATURE_FLOOR,
    NonFiniteLogitsError,
    SamplingParams,
    make_generator,
    sample,
    top_k_filter,
    top_p_filter,
)


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


@pytest.mark.parametrize(("params", "field"), [
    (SamplingParams(strategy="nucleus"), "strategy"), (SamplingParams(top_k=0), "top_k"),
    (SamplingParams(top_p=0.0), "top_p"), (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(temperature=0.0), "temperature"), (SamplingParams(top_k=True), "top_k"),
    (SamplingParams(strategy="beam", num_beams=0), "num_beams"),
    (SamplingParams(strategy="beam", length_penalty=float("inf")), "length_penalty"),
    (SamplingParams(strategy="beam", early_stopping="sometimes"), "early_stopping")])
def test_validate_names_the_bad_field(params: SamplingParams, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        params.validate()


def test_beam_search_is_never_a_per_row_draw() -> None:
    """"beam" is a valid strategy that `sample` refuses (the engine runs it over a job's beams, server/beams.py),
    and no temperature makes it greedy."""
    params = SamplingParams(strategy="beam", num_beams=4, temperature=1e-9)
    params.validate()
    assert params.is_beam and not params.is_greedy
    with pytest.raises(ValueError, match="beam"):
        sample(torch.zeros(1, 8), params)


@pytest.mark.parametrize("strategy", ["top_k", "top_p"])
def test_a_temperature_below_the_floor_is_greedy(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """1e-38 would turn ordinary logits into inf; below TEMPERATURE_FLOOR the draw is the argmax, and its
    log-probabilities are greedy's, without a draw (multinomial is never called)."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 5
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: pytest.fail("multinomial was called"))
    greedy = sample(logits, SamplingParams())
    for temperature in (1e-38, 5e-324, TEMPERATURE_FLOOR / 2):
        params = SamplingParams(strategy=strategy, temperature=temperature)
        assert params.is_greedy
        ids, logprobs = sample(logits, params, make_generator(0))
        assert torch.equal(ids, greedy[0]) and torch.equal(logprobs, greedy[1])
        assert torch.isfinite(logprobs).all()
    assert not SamplingParams(strategy=strategy, temperature=TEMPERATURE_FLOOR).is_greedy


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(strategy="top_k", top_k=5),
                                    SamplingParams(strategy="top_p", top_p=0.9)])
def test_non_finite_rows_are_named_and_never_reach_multinomial(params: SamplingParams,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    logits[1, 3], logits[3, 0], logits[4, 7] = float("nan"), float("inf"), float("-inf")
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: pytest.fail("multinomial was called"))
    with pytest.raises(NonFiniteLogitsError) as caught:
        sample(logits, params, make_generator(0))
    assert caught.value.rows == [1, 3, 4]


def test_finite_logits_that_overflow_at_the_temperature_are_refused() -> None:
    """Finite float32 logits of a runaway head become inf once divided by a small (allowed) temperature."""
    logits = torch.tensor([[1e36, 0.0, -1e36], [1.0, 2.0, 3.0]])
    assert torch.isfinite(sample(logits, SamplingParams(strategy="top_k", top_k=2), make_generator(0))[1]).all()
    with pytest.raises(NonFiniteLogitsError) as caught:
        sample(logits, SamplingParams(strategy="top_k", top_k=2, temperature=1e-3), make_generator(0))
    assert caught.value.rows == [0]


def test_half_precision_logits_are_sampled_in_float32() -> None:
    """60000 / 0.5 overflows float16 (max 65504) but not float32: the draw must not see an inf."""
    logits = torch.tensor([[60000.0, 59999.0, 0.0]], dtype=torch.float16)
    ids, logprobs = sample(logits, SamplingParams(strategy="top_k", top_k=3, temperature=0.5), make_generator(0))
    assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs).all() and int(ids) in (0, 1)


def test_finite_rows_whose_sum_overflows_are_still_drawn() -> None:
    """The cheap per-row sum flags these; the exact check then clears them."""
    logits = torch.tensor([[3e38, 3e38, 0.0], [0.0, 1.0, 2.0]])
    ids, logprobs = sample(logits, SamplingParams())
    assert ids.tolist() == [0, 2] and torch.isfinite(logprobs).all()
