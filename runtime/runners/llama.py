"""The ragged runner for Llama-family bases: Llama (SmolLM2, TinyLlama, Llama 3 ...), Mistral and Qwen2.

They share one block: RMSNorm, rotary position embeddings, grouped-query attention (fewer key/value
heads than query heads), a gated MLP. The model's own modules and weights are reused (the norms,
q/k/v/o projections with whatever biases they carry, the MLP, the final norm) and so is its own
`rotary_emb`, called once per step with every token's position, so the config's theta and its RoPE
scaling (linear, dynamic, yarn, llama3 ...) come out exactly as the model computes them. Only
attention is done here, over the slot cache (runtime.runners.attention), which stores the KV heads.

What the runner cannot honour it refuses when it is built, naming the option: sliding-window
attention, RoPE whose frequencies depend on the longest sequence in a forward (longrope), and
blocks with modules it does not know (a norm on q/k, an extra layer norm ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from heads.errors import UnsupportedBaseError
from runtime.runners.attention import FlatStep, attend
from runtime.runners.cache import Prefill, SlotKVCache

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

# The modules the runner calls (or reads weights from); anything else would be silently skipped.
MODEL_PARTS = {"embed_tokens", "layers", "norm", "rotary_emb"}
LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
# Rotary types whose frequencies follow the longest sequence in a forward: in a ragged batch a sequence's
# positions would then depend on its neighbours.
BATCH_DEPENDENT_ROPE = ("longrope",)


class RaggedLlama:
    """Runs a `LlamaForCausalLM` (or Mistral/Qwen2 causal LM) over decode rows and new prompts in one pass."""

    model_types = ("llama", "mistral", "qwen2")

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in self.model_types:
            raise UnsupportedBaseError(f"RaggedLlama runs {', '.join(self.model_types)} bases; this base is "
                                       f"{model_type or type(model).__name__!r}")
        # Hugging Face builds LlamaForCausalLM (or its Mistral/Qwen2 twin) for these types: the config tells.
        llama = cast("LlamaForCausalLM", model)
        config, inner = llama.config, llama.model
        self.layers = cast("list[LlamaDecoderLayer]", list(inner.layers[: config.num_hidden_layers]))
        _check_parts(model_type, inner, self.layers)
        self.embed_tokens, self.norm, self.rotary_emb = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.n_positions: int = config.max_position_embeddings
        _check_options(model_type, config, self.rotary_emb, self.layers, self.n_positions)
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim  # may differ from hidden / heads (config.head_dim)
        self.n_heads = attn.q_proj.out_features // self.head_dim
        self.n_kv_heads = attn.k_proj.out_features // self.head_dim
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedBaseError(f"{self.n_heads} query heads do not split into groups over "
                                       f"{self.n_kv_heads} key/value heads")
        self.scales: list[float] = [layer.self_attn.scaling for layer in self.layers]

    def new_cache(self, slots: int) -> SlotKVCache:
        weight = self.embed_tokens.weight
        return SlotKVCache(len(self.layers), self.n_kv_heads, self.head_dim, slots, self.n_positions,
                           weight.dtype, weight.device)

    @torch.inference_mode()
    def step(self, cache: SlotKVCache, decode_ids: list[int], decode_lengths: list[int],
             prefills: list[Prefill]) -> Tensor:
        """Final hidden states (after the final norm): one row per decode slot, then one per prefill, then
        the mean row of each prefill that asks for it (`Prefill.mean`).

        Same contract as `RaggedGPT2.step`: decode row i is slot i, feeding `decode_ids[i]` at position
        `decode_lengths[i]`; callers grow the cache first and update their lengths afterwards.
        """
        flat = FlatStep.of(decode_ids, decode_lengths, prefills, self.embed_tokens.weight.device)
        hidden = self.embed_tokens(flat.ids)  # (N, D)
        cos, sin = self.rotary_emb(hidden, flat.positions[None])  # (1, N, d) each, once for every layer
        cos, sin = cos[0], sin[0]  # (N, d)
        for layer, block in enumerate(self.layers):
            attn, x = block.self_attn, block.input_layernorm(hidden)
            q = attn.q_proj(x).view(-1, self.n_heads, self.head_dim)  # (N, H, d)
            k = attn.k_proj(x).view(-1, self.n_kv_heads, self.head_dim)  # (N, H_kv, d)
            v = attn.v_proj(x).view(-1, self.n_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)  # cos (N, 1, d) over the heads
            out = attend(flat, cache, layer, q, k, v, self.scales[layer])  # (N, H, d)
            hidden = hidden + attn.o_proj(out.reshape(-1, self.n_heads * self.head_dim))
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        return flat.final(hidden, self.norm)


def _check_parts(model_type: str, inner: nn.Module, layers: list[LlamaDecoderLayer]) -> None:
    """Refuse a model whose modules are not exactly the ones this runner calls (say, a q/k norm)."""
    checks: list[tuple[str, nn.Module, set[str]]] = [("model", inner, MODEL_PARTS)]
    for i, layer in enumerate(layers):
        checks += [(f"layer {i}", layer, LAYER_PARTS), (f"layer {i}", layer.self_attn, ATTENTION_PARTS)]
    for where, module, known in checks:
        names = {name for name, _ in module.named_children()}
        if names != known:
            extra, missing = sorted(names - known), sorted(known - names)
            raise UnsupportedBaseError(
                f"this {model_type} base's {where} ({type(module).__name__}) has modules the engine's Llama runner "
                f"does not implement: unknown {extra or 'none'}, missing {missing or 'none'}")


def _check_options(model_type: str, config: object, rotary_emb: nn.Module, layers: list[LlamaDecoderLayer],
                   n_positions: int) -> None:
    """Refuse config options that would make the runner's outputs differ from the model's."""
    for i, layer in enumerate(layers):
        # Qwen2 decides per layer (use_sliding_window, max_window_layers); Mistral in its config for every layer.
        window = getattr(layer.self_attn, "sliding_window", getattr(config, "sliding_window", None))
        if window is not None and window < n_positions:
            option = "use_sliding_window" if hasattr(config, "use_sliding_window") else "sliding_window"
            raise UnsupportedBaseError(
                f"this {model_type} base uses sliding-window attention ({option}: a {window}-token window from "
                f"layer {i} on, within its {n_positions}-token context); the engine attends to the whole context, "
                f"so it would not reproduce the model: not supported")
    rope_type = getattr(rotary_emb, "rope_type", "default")
    if rope_type in BATCH_DEPENDENT_ROPE:
        raise UnsupportedBaseError(
            f"this {model_type} base's rope_type {rope_type!r} picks its frequencies from the longest sequence in a "
            f"forward pass, which would tie a sequence's output to its batch: not supported")
