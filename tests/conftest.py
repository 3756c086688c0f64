"""Shared fixtures: a tiny GPT-2-architecture base built on the spot, so tests never download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from training import synth
from training.pretrain import train_tokenizer

# Tiny models gain nothing from a second thread, and OpenMP spinning on a busy 2-core machine
# makes every step many times slower.
torch.set_num_threads(1)


def make_tiny_base(path: Path, seed: int = 0, n_embd: int = 32) -> Path:
    """A random 2-layer GPT-2 with its own byte-level BPE tokenizer, saved as an HF folder."""
    torch.manual_seed(seed)
    rows = synth.generate(200, seed, "train")
    lines = [f"{r['problem']} {r['generated_solution']}" for r in rows] + ["Problem: Solution: Final answer:"]
    tokenizer = train_tokenizer(lines, vocab_size=300)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=n_embd, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base") / "base")


def enliven(model: Any, scale: float = 0.3) -> Any:
    """Every weight matrix redrawn large (seeded): greedy text then varies token to token (see lively_base_dir)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture(scope="session")
def lively_base_dir(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with large random weights, so greedy text varies token to token.

    With the default init a random GPT-2 repeats one token forever, and a test comparing two
    decodes would pass even with wrong positions, padding or caches; these weights make it fail.
    """
    out = tmp_path_factory.mktemp("lively") / "base"
    model = enliven(AutoModelForCausalLM.from_pretrained(tiny_base_dir))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_base_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shapes as tiny_base_dir, different weights: heads from one must not load on the other."""
    return make_tiny_base(tmp_path_factory.mktemp("other-base") / "base", seed=1)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.write_jsonl(synth.generate(64, 0, "train"), out / "train.jsonl")
    synth.write_jsonl(synth.generate(16, 0, "test"), out / "test.jsonl")
    return out
