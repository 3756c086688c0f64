"""A tiny Llama written as a GGUF file the way llama.cpp writes one, so GGUF bases are tested in seconds.

The real SmolLM2 GGUF is a 93 MB package; this one is 150 KB: the embedded base's byte-level BPE
vocabulary and merges as `tokenizer.ggml.*` metadata, a chat template, and float32 tensors under
llama.cpp's names, with the q/k projections permuted for llama.cpp's rotary layout (transformers
un-permutes them on load, so a wrong permutation shows up as different logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from heads.base import EMBEDDED_BASE

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
# HF parameter of a decoder layer -> llama.cpp's tensor name
LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer GQA Llama over the embedded base's vocabulary, weights large enough to vary token to token."""
    vocab = json.loads((EMBEDDED_BASE / "tokenizer.json").read_text())["model"]["vocab"]
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0,
                         eos_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (interleaved rotary halves)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """Write `model` with the embedded base's tokenizer as a llama-architecture GGUF file."""
    cfg = model.config
    tokenizer = json.loads((EMBEDDED_BASE / "tokenizer.json").read_text())["model"]
    tokens = sorted(tokenizer["vocab"], key=tokenizer["vocab"].__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["merges"]]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])  # tied: no output.weight
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            w = weights[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                w = _permute(w, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                w = _permute(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
