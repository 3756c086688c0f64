"""The ragged runner for GPT-2-architecture bases (the embedded default and the real GPT-2).

The block's own modules (ln_1, c_attn, c_proj, ln_2, mlp, ln_f) are reused, so weights, activation
and layer-norm details are exactly the base's; only attention is done here, over the slot cache
(runtime.runners.attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from heads.errors import UnsupportedBaseError
from runtime.runners.attention import FlatStep, attend
from runtime.runners.cache import Prefill, SlotKVCache

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block


class RaggedGPT2:
    """Runs a `GPT2LMHeadModel`'s transformer over decode rows and new prompts in one pass."""

    model_types = ("gpt2",)

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in self.model_types:
            raise UnsupportedBaseError(f"RaggedGPT2 runs GPT-2-architecture bases; this base is "
                                       f"{model_type or type(model).__name__!r}")
        # Hugging Face builds a GPT2LMHeadModel for model_type "gpt2"; only the config can tell, not the type.
        gpt2 = cast("GPT2LMHeadModel", model)
        config, transformer = gpt2.config, gpt2.transformer
        self.wte, self.wpe, self.ln_f = transformer.wte, transformer.wpe, transformer.ln_f
        self.blocks = cast("list[GPT2Block]", list(transformer.h))  # an nn.ModuleList does not type its items
        self.n_embd, self.n_head = config.n_embd, config.n_head
        self.head_dim = self.n_embd // self.n_head
        self.n_positions: int = config.n_positions
        base_scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        # GPT-2 options that change the attention scale per layer; upcasting changes only precision.
        self.scales = [base_scale / (i + 1) if config.scale_attn_by_inverse_layer_idx else base_scale
                       for i in range(len(self.blocks))]

    def new_cache(self, slots: int) -> SlotKVCache:
        weight = self.wte.weight
        return SlotKVCache(len(self.blocks), self.n_head, self.head_dim, slots, self.n_positions,
                           weight.dtype, weight.device)

    @torch.inference_mode()
    def step(self, cache: SlotKVCache, decode_ids: list[int], decode_lengths: list[int],
             prefills: list[Prefill]) -> Tensor:
        """Final hidden states (after ln_f): one row per decode slot, then one per prefill, then the mean
        row of each prefill that asks for it (`Prefill.mean`).

        Decode row i is slot i: it feeds `decode_ids[i]` at position `decode_lengths[i]` (the number
        of tokens already cached), attending to its cache. Callers grow the cache first and update
        their lengths afterwards (+1 per decode row, the prompt length per prefill).
        """
        flat = FlatStep.of(decode_ids, decode_lengths, prefills, self.wte.weight.device)
        hidden = self.wte(flat.ids) + self.wpe(flat.positions)  # (N, D)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.c_attn(block.ln_1(hidden)).view(-1, 3, self.n_head, self.head_dim).unbind(1)
            out = attend(flat, cache, layer, q, k, v, self.scales[layer])  # (N, H, d)
            hidden = hidden + block.attn.c_proj(out.reshape(-1, self.n_embd))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        return flat.final(hidden, self.ln_f)
