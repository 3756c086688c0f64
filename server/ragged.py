"""One forward pass of a GPT-2 base over a ragged batch: new prompts and decoding sequences together.

Why not call the Hugging Face model: continuous batching needs sequences of different lengths to
join and leave between steps. With HF's padded caches every join means re-padding every layer's
cache and every decode row pays for the longest newcomer's prompt. Here all new tokens of a step
are flattened into one (N, D) matrix, so the token-wise work (layer norms, QKV and output
projections, MLPs: nearly all of the cost) runs as one matmul per layer whatever the mix; only
attention is per sequence: one batched call for the decode rows over a slot cache, and one causal
call per new prompt. The block's own modules (ln_1, c_attn, c_proj, ln_2, mlp, ln_f) are reused,
so weights, activation and layer-norm details are exactly the base's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

POSITION_BLOCK = 64  # the slot cache grows its time axis in steps of this many positions


class SlotKVCache:
    """Keys and values of up to `slots` sequences: row s holds slot s's positions 0..length-1.

    Allocated with zeros, so positions a row never wrote hold finite values that attention masks
    out (a zero weight times garbage could be NaN); grown along time as sequences get longer.
    """

    def __init__(self, n_layer: int, n_head: int, head_dim: int, slots: int, max_positions: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.n_layer, self.n_head, self.head_dim, self.slots = n_layer, n_head, head_dim, slots
        self.max_positions, self.dtype, self.device = max_positions, dtype, device
        self.keys: list[Tensor] = []  # per layer (slots, H, capacity, d)
        self.values: list[Tensor] = []
        self.capacity = 0

    def ensure(self, positions: int) -> None:
        """Make room for `positions` positions per slot (never more than the base's context)."""
        if positions <= self.capacity:
            return
        if positions > self.max_positions:
            raise ValueError(f"{positions} positions do not fit the base's context of {self.max_positions}")
        capacity = min(self.max_positions, math.ceil(positions / POSITION_BLOCK) * POSITION_BLOCK)
        shape = (self.slots, self.n_head, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]
        for new, old in zip(keys + values, self.keys + self.values, strict=False):
            new[:, :, : self.capacity] = old
        self.keys, self.values, self.capacity = keys, values, capacity

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction after a sequence leaves)."""
        for tensor in self.keys + self.values:
            tensor[dst, :, :length] = tensor[src, :, :length]

    def release(self) -> None:
        """Drop the buffers; the next `ensure` allocates afresh."""
        self.keys, self.values, self.capacity = [], [], 0


@dataclass
class Prefill:
    """A new prompt: its tokens go through the step once and its keys/values land in every listed slot."""

    token_ids: list[int]
    slots: list[int]  # the request's answer and its comparison decodes share one prefill


class RaggedGPT2:
    """Runs a `GPT2LMHeadModel`'s transformer over decode rows and new prompts in one pass."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type != "gpt2":
            raise ValueError(f"the batching engine runs GPT-2-architecture bases; this base is "
                             f"{model_type or type(model).__name__!r}")
        # Hugging Face builds a GPT2LMHeadModel for model_type "gpt2"; only the config can tell, not the type.
        gpt2 = cast("GPT2LMHeadModel", model)
        config, transformer = gpt2.config, gpt2.transformer
        self.wte, self.wpe, self.ln_f = transformer.wte, transformer.wpe, transformer.ln_f
        self.blocks = cast("list[GPT2Block]", list(transformer.h))  # an nn.ModuleList does not type its items
        self.n_embd, self.n_head = config.n_embd, config.n_head
        self.head_dim = self.n_embd // self.n_head
        self.n_positions = config.n_positions
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
        """Final hidden states (after ln_f): one row per decode slot, then one per prefill.

        Decode row i is slot i: it feeds `decode_ids[i]` at position `decode_lengths[i]` (the number
        of tokens already cached), attending to its cache. Callers grow the cache first and update
        their lengths afterwards (+1 per decode row, the prompt length per prefill).
        """
        device = self.wte.weight.device
        n_decode = len(decode_ids)
        ids = decode_ids + [t for p in prefills for t in p.token_ids]
        positions = decode_lengths + [i for p in prefills for i in range(len(p.token_ids))]
        ids_t = torch.tensor(ids, device=device)
        hidden = self.wte(ids_t) + self.wpe(torch.tensor(positions, device=device))  # (N, D)
        lengths = torch.tensor(decode_lengths, device=device)  # (n_decode,)
        rows = torch.arange(n_decode, device=device)
        span = max(decode_lengths, default=0) + 1  # cached positions the decode rows attend to
        mask = (torch.arange(span, device=device)[None, :] <= lengths[:, None])[:, None, None, :]  # (n, 1, 1, span)
        prefill_slots = [torch.tensor(p.slots, device=device) for p in prefills]
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.c_attn(block.ln_1(hidden)).view(-1, 3, self.n_head, self.head_dim).unbind(1)
            out = torch.empty_like(q)  # (N, H, d)
            keys, values, scale = cache.keys[layer], cache.values[layer], self.scales[layer]
            if n_decode:
                keys[rows, :, lengths] = k[:n_decode]
                values[rows, :, lengths] = v[:n_decode]
                attended = F.scaled_dot_product_attention(
                    q[:n_decode, :, None], keys[:n_decode, :, :span], values[:n_decode, :, :span],
                    attn_mask=mask, scale=scale)  # (n, H, 1, d)
                out[:n_decode] = attended[:, :, 0]
            start = n_decode
            for prefill, slots in zip(prefills, prefill_slots, strict=True):
                end = start + len(prefill.token_ids)
                pk, pv = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)  # (H, P, d)
                keys[slots, :, : end - start] = pk
                values[slots, :, : end - start] = pv
                attended = F.scaled_dot_product_attention(q[start:end].transpose(0, 1)[None], pk[None], pv[None],
                                                          is_causal=True, scale=scale)  # (1, H, P, d)
                out[start:end] = attended[0].transpose(0, 1)
                start = end
            hidden = hidden + block.attn.c_proj(out.reshape(-1, self.n_embd))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        last = list(range(n_decode))
        end = n_decode
        for prefill in prefills:
            end += len(prefill.token_ids)
            last.append(end - 1)
        return self.ln_f(hidden[torch.tensor(last, device=device)])
