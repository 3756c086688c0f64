"""Beam search in the engine (server/beams.py) is transformers' beam search, token for token.

On the embedded mini GPT-2: the engine's answer equals `generate(num_beams=..., length_penalty=...,
early_stopping=...)` for the base's own head, and for every head kind served as the model's LM head
(transformers runs the head's `forward` as `lm_head`, so its beam search is a reference computed from
the head itself); beam jobs batched with other heads' requests change nobody's tokens; a beam job
counts all its beams against the batch limits; bad beam settings are 422s naming the field.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from heads import BackwardAttentionConfig, BackwardAttentionHead, LowRankConfig, LowRankHead, load_head
from heads.base import EMBEDDED_BASE, REPO_ROOT, Base, load_base
from heads.factored import FactoredHead, SharedNorms
from heads.sampling import SamplingParams
from runtime.runners.cache import SlotKVCache
from server.app import create_app
from server.engine import Engine
from server.errors import HeadOutputError
from server.metrics import Metrics
from server.sequence import GenerationJob, JobResult
from server.settings import Settings
from tests.integration.ready import wait_ready
from tests.integration.test_engine_isolation import ConstantHead, drain

# Prompts on which the mini base is unsure enough for beams to matter: some answers differ from greedy, and on
# some the length penalty changes which hypothesis wins (asserted below, so the comparison can fail).
PROMPTS = ["9 +", "The answer is", "eggs", "7", "Problem:", "Tom"]
MATH = "Problem: {problem}\nSolution:"
PROBLEMS = ["Tom has 3 boxes with 14 pens each. How many pens?", "What is 96 - 17?", "Ann reads 5 pages a day for "
            "6 days. How many pages?"]
Case = tuple[str, int, float, bool | str, int]  # prompt, num_beams, length_penalty, early_stopping, max_new_tokens


@pytest.fixture(scope="module")
def base() -> Base:
    return load_base(str(EMBEDDED_BASE))


@pytest.fixture(scope="module")
def reference_model() -> Any:
    """A second copy of the base for transformers' generate, whose LM head the head tests swap."""
    return AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE, dtype=torch.float32).eval()


def make_engine(base: Base, **limits: int) -> Engine:
    return Engine(base, Metrics(), **{"max_queue": 256, "max_batch_size": 32, "max_batch_tokens": 4096, **limits})


def ids_of(base: Base, text: str) -> list[int]:
    return list(base.tokenizer(text)["input_ids"])


def beam_job(base: Base, case: Case, head: Any = None, label: str = "base", **kw: Any) -> GenerationJob:
    prompt, beams, penalty, early, new = case
    params = SamplingParams(strategy="beam", num_beams=beams, length_penalty=penalty, early_stopping=early)
    return GenerationJob(prompt_ids=ids_of(base, prompt), head=head, head_label=label, params=params, seed=0,
                         max_new_tokens=new, **kw)


def hf_beam(model: Any, base: Base, case: Case) -> tuple[list[int], float]:
    """transformers' answer (generated ids, the EOS included) and its length-penalised score."""
    prompt, beams, penalty, early, new = case
    ids = torch.tensor([ids_of(base, prompt)])
    out = model.generate(ids, num_beams=beams, do_sample=False, length_penalty=penalty, early_stopping=early,
                         max_new_tokens=new, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    return out.sequences[0, ids.shape[1]:].tolist(), float(out.sequences_scores[0])


def hf_greedy(model: Any, base: Base, prompt: str, new: int) -> list[int]:
    ids = torch.tensor([ids_of(base, prompt)])
    return model.generate(ids, do_sample=False, max_new_tokens=new, pad_token_id=0)[0, ids.shape[1]:].tolist()


def assert_same_as_transformers(results: list[JobResult], cases: list[Case], model: Any, base: Base) -> None:
    for result, case in zip(results, cases, strict=True):
        tokens, score = hf_beam(model, base, case)
        assert result.main.token_ids == tokens, case
        assert result.main.decoder == "beam" and len(result.main.logprobs) == len(tokens)
        # The answer's per-token log-probabilities are its own lineage's: they give transformers' score.
        assert sum(result.main.logprobs) / len(tokens) ** case[2] == pytest.approx(score, abs=1e-4), case
        finished = result.main.reason.value
        assert finished == ("eos" if tokens[-1] == base.tokenizer.eos_token_id else "length"), case


def test_beam_search_on_the_base_is_transformers_beam_search(base: Base) -> None:
    cases: list[Case] = [(p, beams, penalty, False, 16) for p in PROMPTS for beams in (2, 4)
                         for penalty in (1.0, 0.5, 2.0)]
    cases += [(p, 4, penalty, early, new) for p in PROMPTS[:3] for penalty in (2.0, -1.0)
              for early, new in ((True, 12), ("never", 20))]
    engine = make_engine(base)
    results = engine.run_until_done([beam_job(base, case) for case in cases])  # all batched, joining as room frees
    assert_same_as_transformers(results, cases, base.model, base)
    answers = {case: r.main.token_ids for case, r in zip(cases, results, strict=True)}
    assert any(answers[case] != hf_greedy(base.model, base, case[0], case[4]) for case in cases), "all greedy"
    assert any(len({tuple(answers[(p, b, penalty, False, 16)]) for penalty in (1.0, 0.5, 2.0)}) > 1
               for p in PROMPTS for b in (2, 4)), "the length penalty never mattered"
    assert not engine._active and not engine._owner  # every beam left the batch


class HeadAsLMHead(nn.Module):
    """A head in the place of the model's LM head: transformers' generate then beam-searches the head's logits."""

    def __init__(self, head: nn.Module, embeddings: Tensor) -> None:
        super().__init__()
        self.head, self.embeddings = head, embeddings

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(hidden, self.embeddings)  # (B, T, D) -> (B, T, V)


def kinds(base: Base) -> dict[str, tuple[nn.Module, Any]]:
    """Each head kind: (its module for transformers, what the engine serves: prepared, or in factored form)."""
    math, _ = load_head(REPO_ROOT / "registry" / "math", fingerprint=base.fingerprint)
    linear, _ = load_head(REPO_ROOT / "registry" / "math-linear", fingerprint=base.fingerprint)
    torch.manual_seed(0)
    lowrank = LowRankHead(LowRankConfig(rank=8), vocab_size=base.vocab_size, n_embd=base.n_embd).eval()
    nn.init.normal_(lowrank.up.weight, std=0.3)
    wild = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=32, num_heads=2, residual=True),
                                 vocab_size=base.vocab_size, n_embd=base.n_embd).eval()
    nn.init.normal_(wild.query.weight, std=0.5)
    out: dict[str, tuple[nn.Module, Any]] = {}
    for name, module in (("math", math), ("math-linear", linear), ("lowrank", lowrank), ("wild", wild)):
        module.prepare(base.embeddings)
        out[name] = (module, module)
    assert isinstance(math, BackwardAttentionHead)
    out["math-factored"] = (math, FactoredHead(math, SharedNorms(base.embeddings)))
    return out


@pytest.mark.parametrize("kind", ["math", "math-linear", "lowrank", "wild", "math-factored"])
def test_beam_search_with_a_head_is_transformers_beam_search_over_that_head(base: Base, reference_model: Any,
                                                                            kind: str) -> None:
    module, served = kinds(base)[kind]
    prompts = [MATH.format(problem=p) for p in PROBLEMS[:2]] + ["9 +", "Tom"]
    settings: list[tuple[int, float, bool | str]] = [(2, 1.0, False), (4, 1.0, False), (4, 2.0, False),
                                                     (4, 2.0, True), (4, 2.0, "never")]
    cases: list[Case] = [(p, beams, penalty, early, 14) for p in prompts for beams, penalty, early in settings]
    results = make_engine(base).run_until_done([beam_job(base, c, served, kind) for c in cases])
    original = reference_model.lm_head
    reference_model.lm_head = HeadAsLMHead(module, base.embeddings)
    try:
        assert_same_as_transformers(results, cases, reference_model, base)
    finally:
        reference_model.lm_head = original
    if kind == "math":  # its answers depend on every setting, so a search that ignored one would fail here
        answers = {case: tuple(r.main.token_ids) for case, r in zip(cases, results, strict=True)}
        assert any(len({answers[(p, 4, 2.0, early, 14)] for early in (False, True, "never")}) > 1 for p in prompts)
        assert any(answers[(p, 4, 1.0, False, 14)] != answers[(p, 4, 2.0, False, 14)] for p in prompts)
        assert any(answers[(p, 2, 1.0, False, 14)] != answers[(p, 4, 1.0, False, 14)] for p in prompts)


def others(base: Base) -> list[GenerationJob]:
    """Requests of other heads and decoders (greedy and sampled, with comparisons) that beam jobs join."""
    heads = kinds(base)
    jobs = []
    for i, name in enumerate(["math", "base", "math-linear", "wild", "math-factored", "lowrank"]):
        head = None if name == "base" else heads[name][1]
        params = SamplingParams(strategy="top_k", top_k=20) if i % 3 == 2 else SamplingParams()
        jobs.append(GenerationJob(prompt_ids=ids_of(base, MATH.format(problem=PROBLEMS[i % 3])), head=head,
                                  head_label=name, params=params, seed=100 + i, max_new_tokens=10 + 3 * i,
                                  compare=("greedy", "top_k") if i % 2 else ()))
    return jobs


def outputs(result: JobResult) -> list[tuple[str, list[int], str]]:
    return [(s.decoder, s.token_ids, s.reason.value) for s in [result.main, *result.comparisons]]


def test_beam_jobs_change_no_other_request_and_are_themselves_batch_invariant(base: Base) -> None:
    heads = kinds(base)
    beams = [beam_job(base, (p, 4, 1.0, False, 16), compare=("greedy",)) for p in PROMPTS[:3]]
    beams.append(beam_job(base, (MATH.format(problem=PROBLEMS[0]), 3, 2.0, False, 14), heads["wild"][1], "wild"))
    engine = make_engine(base, max_batch_size=16)  # not all at once: jobs join as others leave
    alone = [outputs(r) for r in engine.run_until_done(others(base))]
    beams_alone = [outputs(r) for r in engine.run_until_done([replace(j) for j in beams])]
    mixed = others(base)
    for i, job in enumerate(beams):
        mixed.insert(2 * i + 1, replace(job))  # other, beam, other, beam ...
    together = [outputs(r) for r in engine.run_until_done(mixed)]
    beam_rows = [2 * i + 1 for i in range(len(beams))]
    assert [together[i] for i in beam_rows] == beams_alone
    assert [r for i, r in enumerate(together) if i not in beam_rows] == alone


def test_a_beam_job_counts_every_beam_against_the_batch_limits(base: Base, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_batch_size 5: a 4-beam job with a comparison fills the batch, and the jobs behind it wait (in order);
    a job wider than any batch (8 beams, 2 comparisons) still runs, alone."""
    engine = make_engine(base, max_batch_size=5)
    steps: list[tuple[int, int]] = []  # per step: sequences, jobs
    next_tokens = engine._next_tokens

    def recording(hidden: Tensor, batch: list[Any]) -> None:
        steps.append((len(batch), len({id(engine._owner[id(seq)]) for seq in batch})))
        next_tokens(hidden, batch)

    monkeypatch.setattr(engine, "_next_tokens", recording)
    greedy = GenerationJob(prompt_ids=ids_of(base, "12 + 7 ="), head=None, head_label="base",
                           params=SamplingParams(), seed=0, max_new_tokens=8, ignore_eos=True)
    jobs = [greedy, beam_job(base, ("eggs", 4, 1.0, False, 12), compare=("greedy",)), replace(greedy),
            beam_job(base, ("Tom", 8, 1.0, False, 10), compare=("greedy", "top_k"))]
    batched = engine.run_until_done(jobs)
    assert max(size for size, _ in steps) == 10  # the wide job, 8 beams and 2 comparisons
    assert all(size <= 5 or n_jobs == 1 for size, n_jobs in steps)  # only ever alone past the limit
    assert (5, 1) in steps  # the 4-beam job and its comparison filled the batch on their own
    assert [outputs(r) for r in batched] == [outputs(engine.run_until_done([replace(j)])[0]) for j in jobs]


def test_a_beam_job_whose_head_fails_fails_alone(base: Base) -> None:
    engine = make_engine(base)
    bystanders = [beam_job(base, ("9 +", 2, 1.0, False, 10)), *others(base)[:2]]
    reference = [outputs(r) for r in engine.run_until_done([replace(j) for j in bystanders])]
    bad = beam_job(base, ("eggs", 4, 1.0, False, 10), ConstantHead(base.vocab_size, float("nan")), "bad",
                   compare=("greedy",))
    recorders = drain(engine, [bystanders[0], bad, *bystanders[1:]])
    (failed, error), *rest = [recorders[1].calls[0], recorders[0].calls[0], *[r.calls[0] for r in recorders[2:]]]
    assert failed is None and isinstance(error, HeadOutputError) and "'bad'" in str(error)
    assert [outputs(r) for r, e in rest if r is not None and e is None] == reference


def test_fork_copies_slots_as_a_permutation_reading_every_source_first() -> None:
    cache = SlotKVCache(n_layer=2, n_kv_heads=1, head_dim=2, slots=4, max_positions=64, dtype=torch.float32,
                        device=torch.device("cpu"))
    cache.ensure(3)
    for tensor in cache.keys + cache.values:
        for slot in range(4):
            tensor[slot] = slot
    cache.fork([1, 2, 0, 0], [0, 1, 2, 3], length=2)  # slots 0..2 rotate; slot 3 takes slot 0's old positions
    for tensor in cache.keys + cache.values:
        assert [tensor[s, 0, 0, 0].item() for s in range(4)] == [1.0, 2.0, 0.0, 0.0]
        assert [tensor[s, 0, 2, 0].item() for s in range(4)] == [0.0, 1.0, 2.0, 3.0]  # past `length`: untouched


# -- over HTTP --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    heads_dir = tmp_path_factory.mktemp("registry")
    shutil.copytree(REPO_ROOT / "registry" / "math", heads_dir / "math")
    settings = Settings(base_model=str(EMBEDDED_BASE), heads_dir=heads_dir, device="cpu", max_new_tokens=64)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def generate(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/generate", json={"raw": True, "return_logprobs": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(answer: dict[str, Any]) -> list[int]:
    return [entry["token_id"] for entry in answer["logprobs"]]


@pytest.mark.parametrize(("prompt", "beams", "penalty"), [("The answer is", 4, 2.0), ("7", 2, 0.5), ("eggs", 4, 1.0)])
def test_generate_with_beams_answers_what_transformers_does(client: TestClient, base: Base, prompt: str, beams: int,
                                                            penalty: float) -> None:
    answer = generate(client, prompt=prompt, max_new_tokens=16, compare=["greedy"], top_logprobs=2,
                      decoding={"strategy": "beam", "num_beams": beams, "length_penalty": penalty})
    tokens, _ = hf_beam(base.model, base, (prompt, beams, penalty, False, 16))
    assert token_ids(answer) == tokens
    assert answer["text"] == base.tokenizer.decode(tokens, skip_special_tokens=True)
    assert all(len(entry["top"]) == 2 for entry in answer["logprobs"])
    (comparison,) = answer["comparisons"]  # comparisons decode beside the beams as ever
    assert comparison["decoder"] == "linear_greedy"
    greedy = hf_greedy(base.model, base, prompt, 16)
    assert comparison["text"] == base.tokenizer.decode(greedy, skip_special_tokens=True)


def test_one_beam_is_greedy_and_a_head_formats_its_prompt(client: TestClient) -> None:
    one = generate(client, prompt="eggs", max_new_tokens=12, decoding={"strategy": "beam", "num_beams": 1})
    assert one["text"] == generate(client, prompt="eggs", max_new_tokens=12)["text"]
    body = {"prompt": PROBLEMS[0], "head": "math", "max_new_tokens": 12, "raw": False}
    beam = generate(client, **body, decoding={"strategy": "beam"})  # num_beams defaults to 4
    assert beam["prompt"] == MATH.format(problem=PROBLEMS[0]) and beam["head"] == "math"


def test_a_stop_string_ends_a_hypothesis_and_is_cut(client: TestClient, base: Base) -> None:
    answer = generate(client, prompt=MATH.format(problem=PROBLEMS[0]), max_new_tokens=40, stop=["."],
                      decoding={"strategy": "beam", "num_beams": 4})
    decoded = base.tokenizer.decode(token_ids(answer), skip_special_tokens=True)
    assert answer["finish_reason"] == "stop" and "." not in answer["text"]
    assert answer["text"] == decoded[:decoded.index(".")]


@pytest.mark.parametrize(("decoding", "extra", "field"), [
    ({"strategy": "beam", "num_beams": 0}, {}, "num_beams"),
    ({"strategy": "beam", "num_beams": 9}, {}, "num_beams"),
    ({"strategy": "beam", "length_penalty": 11.0}, {}, "length_penalty"),
    ({"strategy": "beam", "early_stopping": "sometimes"}, {}, "early_stopping"),
    ({"strategy": "greedy", "num_beams": 4}, {}, "num_beams"),
    ({"strategy": "top_k", "length_penalty": 2.0}, {}, "length_penalty"),
    ({"strategy": "beam", "num_beams": 2}, {"stream": True}, "stream")])
def test_bad_beam_settings_are_422_naming_the_field(client: TestClient, decoding: dict[str, Any],
                                                    extra: dict[str, Any], field: str) -> None:
    r = client.post("/generate", json={"prompt": "eggs", "decoding": decoding, **extra})
    assert r.status_code == 422 and field in r.json()["detail"], r.text


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_length_penalty_that_is_not_finite_is_422(client: TestClient, value: str) -> None:
    body = '{"prompt": "eggs", "decoding": {"strategy": "beam", "length_penalty": ' + value + "}}"
    r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "length_penalty" in r.json()["detail"], r.text


def test_the_beam_cost_bench_runs_and_reports_every_beam_count(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.beam_cost import main

    assert main(["--beams", "1", "2", "--prompts", "2", "--concurrency", "2", "--max-new-tokens", "4",
                 "--rounds", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["num_beams"] for row in report["results"]] == [1, 2]
    assert [row["batch_rows"] for row in report["results"]] == [2, 4]
    assert all(row["tokens_per_s_batched"] > 0 and row["latency_median_s"] > 0 for row in report["results"])
