"""The committed artifacts: the embedded base meets its bar, and the committed heads load on it."""

import json
import os

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from heads import load_head
from heads.base import EMBEDDED_BASE, REPO_ROOT, load_base
from training.pretrain import addition_accuracy, held_out_pairs


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_embedded_base_is_a_small_plain_hf_folder() -> None:
    size = sum(p.stat().st_size for p in EMBEDDED_BASE.iterdir())
    assert size <= 20 * 2**20
    provenance = json.loads((EMBEDDED_BASE / "provenance.json").read_text())
    for key in ("command", "seed", "steps", "wall_time_s", "final_train_loss", "held_out", "data"):
        assert key in provenance
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE)
    assert model.config.model_type == "gpt2" and model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_embedded_base_adds_held_out_pairs() -> None:
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_BASE)
    seed = json.loads((EMBEDDED_BASE / "provenance.json").read_text())["seed"]
    pairs = sorted(held_out_pairs(seed))[::4]  # 250 pairs never seen in pretraining
    assert addition_accuracy(model, tokenizer, pairs) >= 0.95


@pytest.mark.parametrize("name,kind", [("math", "backward_attention"), ("math-linear", "linear")])
def test_committed_heads_load_on_the_embedded_base(name: str, kind: str) -> None:
    base = load_base(str(EMBEDDED_BASE))
    head, meta = load_head(REPO_ROOT / "registry" / name, fingerprint=base.fingerprint,
                           vocab_size=base.vocab_size, n_embd=base.n_embd)
    assert meta.head_type == kind and meta.task == "math"
    assert meta.base_model_name_or_path == os.path.join("models", "mini-gpt2")
    assert "{problem}" in meta.prompt_template and meta.training["final_metrics"]["held_out_loss"] > 0
