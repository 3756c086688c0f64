"""Continuous batching: one base forward per step for every sequence, and outputs that do not depend on
what else is in the batch.

Runs on the embedded mini GPT-2 with the committed heads, whose sharp distributions make "same
tokens" a meaningful check (a random tiny base has near-ties everywhere).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
import torch

from heads import BackwardAttentionConfig, BackwardAttentionHead, load_head
from heads.base import EMBEDDED_BASE, REPO_ROOT, Base, load_base
from heads.factored import FactoredHead, SharedNorms
from heads.sampling import SamplingParams
from runtime.runners import Prefill, RaggedGPT2
from server.engine import Engine, Pending
from server.metrics import Metrics
from server.sequence import GenerationJob, JobResult

PROMPTS = ["12 + 7 =", "Problem: Tom has 3 boxes with 14 pens each. How many pens?\nSolution:", "45 + 38 =",
           "Problem: What is 96 - 17?\nSolution:", "3", "Problem: A farmer sells 7 eggs a day for 12 days. "
           "How many eggs does he sell?\nSolution:", "81 + 9 =", "Problem: 5 * 6 = ?\nSolution:"]


@pytest.fixture(scope="module")
def base() -> Base:
    return load_base(str(EMBEDDED_BASE))


@pytest.fixture(scope="module")
def heads(base: Base) -> dict[str, Any]:
    """The committed heads plus a random backward-attention head that is clearly not the base."""
    loaded: dict[str, Any] = {"base": None}
    for name in ("math", "math-linear"):
        module, _ = load_head(REPO_ROOT / "registry" / name, fingerprint=base.fingerprint)
        module.prepare(base.embeddings)
        loaded[name] = module
    torch.manual_seed(0)
    wild = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=32, num_heads=2, residual=True),
                                 vocab_size=base.vocab_size, n_embd=base.n_embd)
    torch.nn.init.normal_(wild.query.weight, std=0.5)
    wild.eval().prepare(base.embeddings)
    loaded["wild"] = wild
    norms = SharedNorms(base.embeddings)
    math_module, _ = load_head(REPO_ROOT / "registry" / "math", fingerprint=base.fingerprint)
    loaded["math-factored"] = FactoredHead(math_module, norms)  # the form a head has on its first uses
    loaded["wild-factored"] = FactoredHead(wild, norms)
    return loaded


def make_engine(base: Base, **limits: int) -> Engine:
    settings = {"max_queue": 256, "max_batch_size": 32, "max_batch_tokens": 4096, **limits}
    return Engine(base, Metrics(), **settings)


def job(base: Base, heads: dict[str, Any], i: int, strategy: str = "greedy", **kw: Any) -> GenerationJob:
    """The i-th job of a varied mix: prompt lengths, heads, comparisons and lengths all differ."""
    name = list(heads)[i % len(heads)]
    return GenerationJob(prompt_ids=list(base.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]),
                         head=heads[name], head_label=name, params=SamplingParams(strategy=strategy, top_k=20),
                         seed=1000 + i, max_new_tokens=6 + (i * 5) % 17,
                         compare=(("greedy", "top_k") if i % 3 == 0 else ()), **kw)


def outputs(result: JobResult) -> list[tuple[str, list[int], str]]:
    return [(s.decoder, s.token_ids, s.reason.value) for s in [result.main, *result.comparisons]]


def fresh(jobs: list[GenerationJob]) -> list[GenerationJob]:
    return [replace(j) for j in jobs]


def test_ragged_step_matches_the_hf_forward(base: Base) -> None:
    """Decode rows and new prompts of different lengths in one pass give the hidden states HF gives each alone."""
    model, tok = RaggedGPT2(base.model), base.tokenizer
    cache = model.new_cache(4)
    first, second, late = (list(tok(p)["input_ids"]) for p in PROMPTS[:3])
    cache.ensure(64)
    model.step(cache, [], [], [Prefill(first, [0]), Prefill(second, [1, 2])])
    hidden = model.step(cache, [5, 6, 7], [len(first), len(second), len(second)], [Prefill(late, [3])])

    def hf(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return base.model.transformer(torch.tensor([ids])).last_hidden_state[0, -1]  # type: ignore[no-any-return]

    for row, ids in enumerate([first + [5], second + [6], second + [7], late]):
        torch.testing.assert_close(hidden[row], hf(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "top_k", "top_p"])
def test_output_alone_equals_output_in_a_batch_of_16(base: Base, heads: dict[str, Any], strategy: str) -> None:
    """16 requests with other prompts, lengths and heads (some with comparisons) decode exactly as alone."""
    jobs = [job(base, heads, i, strategy) for i in range(16)]
    engine = make_engine(base)
    alone = [outputs(engine.run_until_done([j])[0]) for j in fresh(jobs)]
    together = [outputs(r) for r in engine.run_until_done(fresh(jobs))]
    assert together == alone
    assert len({tuple(o[0][1]) for o in alone}) > 8  # the mix really varies


def test_factored_and_prepared_forms_of_a_head_decode_the_same(base: Base, heads: dict[str, Any]) -> None:
    engine = make_engine(base)
    for name in ("math", "wild"):
        jobs = [replace(job(base, heads, i), head=heads[name], head_label=name, compare=()) for i in range(4)]
        factored = [replace(j, head=heads[f"{name}-factored"]) for j in jobs]
        prepared = [outputs(r) for r in engine.run_until_done(jobs)]
        assert [outputs(r) for r in engine.run_until_done(factored)] == prepared


def test_sequences_join_and_leave_between_steps(base: Base, heads: dict[str, Any]) -> None:
    """With room for 5 sequences, later requests join as earlier ones finish; outputs stay the same."""
    jobs = [job(base, heads, i, "top_k") for i in range(12)]
    reference = [outputs(r) for r in make_engine(base).run_until_done(fresh(jobs))]
    engine = make_engine(base, max_batch_size=5)
    sizes: list[int] = []
    step = engine.model.step

    def watched(cache: Any, decode_ids: list[int], lengths: list[int], prefills: list[Prefill]) -> Any:
        sizes.append(len(decode_ids) + sum(len(p.slots) for p in prefills))
        return step(cache, decode_ids, lengths, prefills)

    engine.model.step = watched  # type: ignore[method-assign]
    results = engine.run_until_done(fresh(jobs))
    assert [outputs(r) for r in results] == reference
    assert max(sizes) <= 5 and sizes.count(5) > 1  # full batches, never over the limit
    joined_mid_flight = [r for r in results if r.started_at > min(x.finished_at for x in results)]
    assert joined_mid_flight  # someone was admitted after someone else had already left


def test_admission_is_first_come_first_served(base: Base, heads: dict[str, Any]) -> None:
    jobs = [job(base, heads, i) for i in range(10)]
    results = make_engine(base, max_batch_size=4).run_until_done(jobs)
    starts = [r.started_at for r in results]
    assert starts == sorted(starts)


def test_token_budget_spreads_prompts_over_steps_but_never_starves_a_long_one(base: Base,
                                                                             heads: dict[str, Any]) -> None:
    long_prompt = list(base.tokenizer(PROMPTS[5])["input_ids"])
    engine = make_engine(base, max_batch_tokens=len(long_prompt) - 1)
    prefills_per_step: list[int] = []
    step = engine.model.step

    def watched(cache: Any, decode_ids: list[int], lengths: list[int], prefills: list[Prefill]) -> Any:
        prefills_per_step.append(sum(len(p.token_ids) for p in prefills))
        return step(cache, decode_ids, lengths, prefills)

    engine.model.step = watched  # type: ignore[method-assign]
    jobs = [replace(job(base, heads, 5), max_new_tokens=3), replace(job(base, heads, 1), max_new_tokens=3)]
    results = engine.run_until_done(jobs)
    assert all(len(r.main.token_ids) == 3 for r in results)
    assert prefills_per_step[0] == len(long_prompt)  # over the budget, so it ran alone...
    assert max(prefills_per_step[1:]) <= len(long_prompt) - 1  # ...and the next waited for room


def test_ignore_eos_decodes_past_the_end_of_sequence(base: Base, heads: dict[str, Any]) -> None:
    engine = make_engine(base)
    stops = replace(job(base, heads, 0), head=None, head_label="base", max_new_tokens=40, compare=())
    ended = engine.run_until_done([stops])[0].main
    assert ended.reason.value == "eos" and len(ended.token_ids) < 40
    kept = engine.run_until_done([replace(stops, ignore_eos=True)])[0].main
    assert kept.reason.value == "length" and len(kept.token_ids) == 40
    assert kept.token_ids[:len(ended.token_ids)] == ended.token_ids


def test_an_abandoned_request_frees_its_slots_and_the_others_finish(base: Base, heads: dict[str, Any]) -> None:
    engine = make_engine(base)
    engine.start()
    gone = threading.Event()
    done: dict[int, JobResult] = {}
    finished = threading.Event()

    def settle_for(i: int) -> Any:
        def settle(result: JobResult | None, error: BaseException | None) -> None:
            assert error is None and result is not None
            done[i] = result
            if len(done) == 2:
                finished.set()
        return settle

    try:
        long_job = replace(job(base, heads, 0), max_new_tokens=200, ignore_eos=True)
        engine.submit(Pending(long_job, settle_for(99), gone.is_set))
        for i in range(2):
            engine.submit(Pending(replace(job(base, heads, i + 1), max_new_tokens=30, ignore_eos=True), settle_for(i)))
        gone.set()  # the first caller disconnects while decoding
        assert finished.wait(30)
    finally:
        engine.stop()
    assert sorted(done) == [0, 1]  # the abandoned job is never answered
    assert not engine._active  # every slot is free again
