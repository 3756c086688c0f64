"""The engine's half-precision path (HEADSERVE_DTYPE on cuda), exercised on the CPU with the embedded base.

No GPU is needed to check the dtype plumbing: a bfloat16 or float16 base with float32 heads in every
form (factored, materialised, linear) must decode, and agree with float32 where the margin is wide.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from heads.base import load_base
from heads.sampling import SamplingParams
from server.engine import Engine
from server.head_cache import HeadCache
from server.metrics import Metrics
from server.registry import Registry
from server.sequence import GenerationJob, JobResult

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Problem: What is 12 + 7?\nSolution:"


def decode_all(dtype: torch.dtype) -> list[JobResult]:
    base = load_base(str(REPO_ROOT / "models" / "mini-gpt2"), dtype=dtype)
    heads = []
    for materialize_after in (0, 1):  # 0: factored form, 1: materialised keys
        cache = HeadCache(Registry(REPO_ROOT / "registry"), base, Metrics(), 8, materialize_after=materialize_after)
        heads += [cache.get("math").module, cache.get("math-linear").module]
    engine = Engine(base, Metrics(), max_queue=8, max_batch_size=32, max_batch_tokens=4096)
    ids = base.tokenizer(PROMPT)["input_ids"]
    jobs = [GenerationJob(prompt_ids=ids, head=head, head_label="x", params=SamplingParams(strategy=strategy), seed=1,
                          max_new_tokens=8, compare=("greedy", "top_k"))
            for head in (None, *heads) for strategy in ("greedy", "top_k")]
    return engine.run_until_done(jobs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_decodes_with_every_head_form(dtype: torch.dtype) -> None:
    reference, half = decode_all(torch.float32), decode_all(dtype)
    for ref, got in zip(reference, half, strict=True):
        for ref_seq, seq in zip([ref.main, *ref.comparisons], [got.main, *got.comparisons], strict=True):
            assert len(seq.token_ids) >= 1 and all(math.isfinite(lp) and lp <= 0 for lp in seq.logprobs)
            if ref_seq.params.strategy == "greedy":
                assert seq.token_ids[0] == ref_seq.token_ids[0]  # the first greedy token has a wide margin
    math_factored, math_materialised = half[2].main, half[6].main
    assert math_factored.token_ids[:2] == math_materialised.token_ids[:2]
