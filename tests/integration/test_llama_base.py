"""The server on a Llama-family base: a tiny random Llama (grouped-query attention, RoPE theta) saved as an HF
folder with a local tokenizer, served through the whole app, gives Hugging Face's own greedy `generate`
tokens; the engine's batching leaves every request's output as it is alone; and a base the runner cannot
reproduce (sliding-window attention) is refused at start-up with a readable reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from heads.base import Base, load_base
from heads.sampling import SamplingParams
from runtime.runners import RaggedLlama
from server.app import create_app
from server.engine import Engine
from server.metrics import Metrics
from server.schemas import COMPARE_ALL
from server.sequence import GenerationJob, JobResult
from server.settings import Settings
from tests.conftest import enliven
from tests.integration.ready import wait_ready

PROMPTS = ["12 + 7 =", "Problem: Tom has 3 boxes with 14 pens each. How many pens?\nSolution:", "45",
           "Problem: What is 96 - 17?\nSolution:"]


@pytest.fixture(scope="module")
def llama_dir(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with 4 query / 2 key-value heads and large weights, so greedy text varies."""
    out = tmp_path_factory.mktemp("llama") / "base"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)  # the tiny GPT-2's byte-level BPE, built offline
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=True,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    model = enliven(LlamaForCausalLM(config))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_base(llama_dir: Path) -> Base:
    return load_base(str(llama_dir))


@pytest.fixture(scope="module")
def client(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(base_model=str(llama_dir), heads_dir=tmp_path_factory.mktemp("registry"), device="cpu",
                        max_new_tokens=32)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def hf_greedy(llama_dir: Path, text: str, n: int) -> list[int]:
    """Hugging Face's own greedy `generate` (its cache, its masks), never stopping early."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = AutoTokenizer.from_pretrained(llama_dir)(text, return_tensors="pt")["input_ids"]
    model.generation_config.eos_token_id = None  # as the request's ignore_eos (an unset value falls back to it)
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0)
    return [int(t) for t in out[0, ids.shape[1]:]]


def test_generate_on_a_llama_base_gives_hf_greedy_tokens(client: TestClient, llama_dir: Path) -> None:
    for text in PROMPTS[:2]:
        r = client.post("/generate", json={"prompt": text, "max_new_tokens": 16, "return_logprobs": True,
                                           "ignore_eos": True})
        assert r.status_code == 200, r.text
        ids = [t["token_id"] for t in r.json()["logprobs"]]
        want = hf_greedy(llama_dir, text, 16)
        assert ids == want
        assert len(set(want)) > 4  # the decode varies: equality means something


def test_the_engine_runs_a_llama_base_with_batch_invariant_outputs(llama_base: Base) -> None:
    """Requests of different lengths, some with comparison decodes sharing their prefill, joining and leaving
    a batch of 5 slots (so slots move), decode exactly as each does alone."""
    tok = llama_base.tokenizer
    jobs = [GenerationJob(prompt_ids=list(tok(PROMPTS[i % 4])["input_ids"]), head=None, head_label="base",
                          params=SamplingParams(strategy="top_k" if i % 2 else "greedy", top_k=20), seed=100 + i,
                          max_new_tokens=5 + (i * 7) % 13, compare=COMPARE_ALL if i % 3 == 0 else (),
                          ignore_eos=True) for i in range(8)]
    engine = Engine(llama_base, Metrics(), max_queue=64, max_batch_size=5, max_batch_tokens=4096)
    assert isinstance(engine.model, RaggedLlama)

    def outputs(results: list[JobResult]) -> list[list[list[int]]]:
        return [[s.token_ids for s in [r.main, *r.comparisons]] for r in results]

    alone = [outputs(engine.run_until_done([replace(j)])) for j in jobs]
    together = outputs(engine.run_until_done([replace(j) for j in jobs]))
    assert together == [a[0] for a in alone]


def test_a_base_with_sliding_window_attention_is_refused_by_name_at_start_up(
        tiny_base_dir: Path, tmp_path: Path) -> None:
    """The server does not serve what its runner cannot reproduce: /readyz says why, naming the option."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                           sliding_window=16, tie_word_embeddings=True)
    MistralForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    settings = Settings(base_model=str(tmp_path / "base"), heads_dir=tmp_path / "registry", device="cpu")
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 30
        while "failed to load" not in (detail := str(c.get("/readyz").json())) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/readyz").status_code == 503
        assert "UnsupportedBaseError" in detail and "sliding-window attention (sliding_window" in detail
