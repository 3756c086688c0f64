"""The slot KV cache every ragged runner writes to, and the new prompts a step takes in.

Why slots: continuous batching lets sequences join and leave between steps. A slot cache gives each
active sequence one row of a preallocated buffer, so a decode step attends to a batch of rows with
one call and a leaving sequence is replaced by moving the last slot into its row, instead of
re-padding every layer's cache. It stores the base's key/value heads (fewer than its query heads
under grouped-query attention), so a Llama-family base pays for its KV heads only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

POSITION_BLOCK = 64  # the slot cache grows its time axis in steps of this many positions


class SlotKVCache:
    """Keys and values of up to `slots` sequences: row s holds slot s's positions 0..length-1.

    Allocated with zeros, so positions a row never wrote hold finite values that attention masks
    out (a zero weight times garbage could be NaN); grown along time as sequences get longer.
    """

    def __init__(self, n_layer: int, n_kv_heads: int, head_dim: int, slots: int, max_positions: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.n_layer, self.n_kv_heads, self.head_dim, self.slots = n_layer, n_kv_heads, head_dim, slots
        self.max_positions, self.dtype, self.device = max_positions, dtype, device
        self.keys: list[Tensor] = []  # per layer (slots, H_kv, capacity, d)
        self.values: list[Tensor] = []
        self.capacity = 0

    def ensure(self, positions: int) -> None:
        """Make room for `positions` positions per slot (never more than the base's context)."""
        if positions <= self.capacity:
            return
        if positions > self.max_positions:
            raise ValueError(f"{positions} positions do not fit the base's context of {self.max_positions}")
        capacity = min(self.max_positions, math.ceil(positions / POSITION_BLOCK) * POSITION_BLOCK)
        shape = (self.slots, self.n_kv_heads, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]
        for new, old in zip(keys + values, self.keys + self.values, strict=False):
            new[:, :, : self.capacity] = old
        self.keys, self.values, self.capacity = keys, values, capacity

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction after a sequence leaves)."""
        for tensor in self.keys + self.values:
            tensor[dst, :, :length] = tensor[src, :, :length]

    def fork(self, src: list[int], dst: list[int], length: int) -> None:
        """Slot `dst[i]` takes slot `src[i]`'s first `length` positions, all at once: beam search's beams that
        continue another beam's prefix take its keys/values. Every source is read before any slot is written,
        so a permutation of slots is safe."""
        if not dst:
            return
        src_rows = torch.tensor(src, dtype=torch.long, device=self.device)
        dst_rows = torch.tensor(dst, dtype=torch.long, device=self.device)
        for tensor in self.keys + self.values:
            tensor[dst_rows, :, :length] = tensor[src_rows, :, :length]  # the right side is a copy

    def release(self) -> None:
        """Drop the buffers; the next `ensure` allocates afresh."""
        self.keys, self.values, self.capacity = [], [], 0


@dataclass
class Prefill:
    """A new prompt: its tokens go through the step once and its keys/values land in every listed slot.

    A classification is a prefill with no slot (it decodes nothing, so nothing needs caching) that may ask
    for `mean`: its final hidden states averaged over all of its positions, for a mean-pooling classifier.
    """

    token_ids: list[int]
    slots: list[int]  # the request's answer and its comparison decodes share one prefill
    mean: bool = False  # the step also returns the mean of this prompt's final hidden states
