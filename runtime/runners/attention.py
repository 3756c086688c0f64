"""What every ragged runner does the same way: lay a step's tokens out flat, and attend over the slot cache.

A step mixes decode rows (one new token per active sequence, at its own position) with new prompts
of any length. Runners differ in their blocks (GPT-2's LayerNorm and learned positions, Llama's RMSNorm,
RoPE and SwiGLU) but not in this: all new tokens sit in one (N, D) matrix, decode rows first, and
attention is the only per-sequence work: one batched call for every decode row over its cache slot,
one causal call per new prompt, whose keys and values land in all of its slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.runners.cache import Prefill, SlotKVCache


@dataclass
class FlatStep:
    """One step's tokens, flattened: row i < n_decode is slot i's new token, then each prompt's tokens."""

    ids: Tensor  # (N,) token ids
    positions: Tensor  # (N,) each token's position in its own sequence
    n_decode: int
    rows: Tensor  # (n_decode,) 0..n_decode-1: decode row i is cache slot i
    lengths: Tensor  # (n_decode,) tokens already cached per decode row: where its new token goes
    span: int  # cached positions the decode rows attend to (the longest one's, plus its new token)
    mask: Tensor  # (n_decode, 1, 1, span) which of them each decode row may see
    prompts: list[tuple[int, int, Tensor]]  # per prefill: its rows start:end and its slots (as a tensor)
    last: Tensor  # (n_decode + n_prefill,) the rows the step returns: every decode row, each prompt's last
    means: list[tuple[int, int]]  # rows start:end of each prefill that asks for its mean (Prefill.mean), in order

    @classmethod
    def of(cls, decode_ids: list[int], decode_lengths: list[int], prefills: list[Prefill],
           device: torch.device) -> FlatStep:
        n_decode = len(decode_ids)
        ids = decode_ids + [t for p in prefills for t in p.token_ids]
        positions = decode_lengths + [i for p in prefills for i in range(len(p.token_ids))]
        lengths = torch.tensor(decode_lengths, dtype=torch.long, device=device)  # (n_decode,)
        span = max(decode_lengths, default=0) + 1
        mask = (torch.arange(span, device=device)[None, :] <= lengths[:, None])[:, None, None, :]
        prompts, last, means, start = [], list(range(n_decode)), [], n_decode
        for prefill in prefills:
            end = start + len(prefill.token_ids)
            prompts.append((start, end, torch.tensor(prefill.slots, dtype=torch.long, device=device)))
            last.append(end - 1)
            if prefill.mean:
                means.append((start, end))
            start = end
        return cls(ids=torch.tensor(ids, dtype=torch.long, device=device),
                   positions=torch.tensor(positions, dtype=torch.long, device=device), n_decode=n_decode,
                   rows=torch.arange(n_decode, device=device), lengths=lengths, span=span, mask=mask, prompts=prompts,
                   last=torch.tensor(last, dtype=torch.long, device=device), means=means)

    def final(self, hidden: Tensor, norm: Callable[[Tensor], Tensor]) -> Tensor:
        """What a runner's step returns, from the last layer's (N, D) output and the base's final norm: the
        normed rows in `last`, then the mean of each `means` prompt's normed rows (averaged in float32).

        The final norm is per token, so only the rows returned (and those averaged) pay for it.
        """
        out = norm(hidden[self.last])  # (n_decode + n_prefill, D)
        if not self.means:
            return out
        means = [norm(hidden[start:end]).float().mean(0) for start, end in self.means]  # each (D,)
        return torch.cat([out, torch.stack(means).to(out.dtype)])  # (n_decode + n_prefill + n_mean, D)


def attend(step: FlatStep, cache: SlotKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Store the step's keys and values in `cache` and attend: q (N, H, d), k and v (N, H_kv, d) -> (N, H, d).

    Grouped-query attention never copies keys: query head h reads key/value head h // G (G = H / H_kv,
    as Hugging Face's `repeat_kv` has it). A decode row's G query heads of one KV head go in as G query
    positions of that head (the padding mask is the same for all of them): on CPU this beat both
    `enable_gqa` (1.3x) and repeating the cache (4-30x) for 32 rows of SmolLM2's shape. A prompt's
    causal call uses `enable_gqa`, the fastest there.
    """
    n_heads, n_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    groups = n_heads // n_kv
    keys, values, n = cache.keys[layer], cache.values[layer], step.n_decode
    out = torch.empty_like(q)  # (N, H, d)
    if n:
        keys[step.rows, :, step.lengths] = k[:n]
        values[step.rows, :, step.lengths] = v[:n]
        attended = F.scaled_dot_product_attention(
            q[:n].view(n, n_kv, groups, head_dim), keys[:n, :, : step.span], values[:n, :, : step.span],
            attn_mask=step.mask, scale=scale)  # (n, H_kv, G, d)
        out[:n] = attended.reshape(n, n_heads, head_dim)
    for start, end, slots in step.prompts:
        pk, pv = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)  # (H_kv, P, d)
        keys[slots, :, : end - start] = pk
        values[slots, :, : end - start] = pv
        attended = F.scaled_dot_product_attention(q[start:end].transpose(0, 1)[None], pk[None], pv[None],
                                                  is_causal=True, scale=scale, enable_gqa=groups > 1)  # (1, H, P, d)
        out[start:end] = attended[0].transpose(0, 1)
    return out
