"""Batched decoding on the frozen base with a swappable output head, and teacher-forced scoring.

Why our own loop instead of `model.generate`: the head replaces the LM head per call, so each
step needs the base's last hidden state, not its logits. The loop keeps the base's KV cache,
left-pads prompts so every row's newest token sits in the last column, and gives each row its
own positions (cumsum of the attention mask), so a batched row decodes exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from heads import HeadModule
from heads.base import Base
from heads.sampling import FinishReason, SamplingParams, sample
from training.data import collate

log = logging.getLogger(__name__)

Strategy = Literal["greedy", "top_k"]
STRATEGIES = ("greedy", "top_k")


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, including the EOS that ended the row (if one did)
    text: str  # token_ids decoded without special tokens
    finish_reason: str  # a FinishReason value: "eos" or "length" (max_new_tokens or the base context ran out)
    n_tokens: int  # len(token_ids): every token the model produced, EOS included


def _pad_id(base: Base) -> int:
    tok = base.tokenizer
    for pad in (tok.pad_token_id, tok.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def _step_logits(base: Base, head: HeadModule | None) -> Callable[[Tensor], Tensor]:
    """(B, D) last hidden -> (B, V) logits from the head, or from the base's own LM head."""
    if head is None:
        return base.linear_logits
    head.prepare(base.embeddings)
    return head.decode


def _kv_cache(out: Any) -> dict[str, Any]:
    """The step's KV cache as the next call's keyword: `cache` where transformers has renamed it (5.x, which
    logs a deprecation warning for the old name), `past_key_values` before that."""
    if "cache" in {f.name for f in dataclasses.fields(out)}:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def _choose(logits: Tensor, strategy: Strategy, top_k: int, generator: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) next ids, drawn exactly as the server draws them."""
    return sample(logits, SamplingParams(strategy=strategy, top_k=top_k), generator)[0]


@torch.no_grad()
def _generate_batch(base: Base, prompts: list[list[int]], step_logits: Callable[[Tensor], Tensor],
                    strategy: Strategy, top_k: int, max_new_tokens: int,
                    generator: torch.Generator | None, end_ids: Sequence[int] | None = None,
                    ) -> list[tuple[list[int], str]]:
    device, eos = base.device, base.tokenizer.eos_token_id
    ends = torch.tensor(list(end_ids) if end_ids is not None else [] if eos is None else [eos], dtype=torch.long,
                        device=device)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), _pad_id(base), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: the newest token of every row is the last column
        input_ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    # A row may generate until its whole sequence fills the base context.
    budget = (base.n_positions - lengths).clamp(max=max_new_tokens)  # (B,)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, W)
    out = base.hidden_states(input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    generated: list[list[int]] = [[] for _ in prompts]
    reasons = [FinishReason.length.value] * len(prompts)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(int(budget.max())):
        next_ids = _choose(step_logits(out.last_hidden_state[:, -1]), strategy, top_k, generator)  # (B,)
        hit_eos = ~finished & torch.isin(next_ids, ends)
        # One device-to-host copy per step, not one per row.
        for i, (token, active, stop) in enumerate(zip(next_ids.tolist(), (~finished).tolist(), hit_eos.tolist(),
                                                      strict=True)):
            if active:
                generated[i].append(token)
            if stop:
                reasons[i] = FinishReason.eos.value
        finished |= hit_eos | (budget <= step + 1)
        if bool(finished.all()):
            break
        # Finished rows keep stepping (the batch moves together) but their new tokens are masked
        # out, so their positions stop growing and never pass the base context.
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)  # (B, W + step + 1)
        position_ids = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)  # (B, 1)
        out = base.hidden_states(next_ids[:, None], attention_mask=mask, position_ids=position_ids,
                                 **_kv_cache(out), use_cache=True)
    return list(zip(generated, reasons, strict=True))


def generate(base: Base, prompts: Sequence[Sequence[int]], *, head: HeadModule | None = None,
             strategy: Strategy = "greedy", top_k: int = 50, max_new_tokens: int = 128, seed: int = 0,
             batch_size: int = 16, on_batch: Callable[[int], Any] | None = None,
             end_ids: Sequence[int] | None = None) -> list[Generation]:
    """Continue each prompt (token ids) with the base plus `head` (None: the base's own LM head).

    A row ends at any of `end_ids` (default: the tokenizer's EOS; a chat prompt's also ends at its
    template's end-of-turn token, `heads.prompts.PromptStyle.end_ids`), as on the server.

    Prompts are sorted by length into batches to limit padding; results come back in input order.
    Top-k draws come from one `torch.Generator` seeded with `seed`, so the same seed, prompts and
    batch size reproduce the text (batching decides the order in which rows draw).
    A prompt longer than the context keeps its last `n_positions - 1` tokens (logged).
    `on_batch(n)` is called after each batch with its size (progress bars).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if top_k < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"top_k, max_new_tokens and batch_size must be >= 1, got {top_k}, {max_new_tokens}, "
                         f"{batch_size}")
    keep = base.n_positions - 1
    clipped = [list(p)[-keep:] for p in prompts]
    if any(len(p) == 0 for p in clipped):
        raise ValueError("every prompt needs at least one token")
    n_cut = sum(len(p) > keep for p in prompts)
    if n_cut:
        log.warning("%d prompt(s) longer than the base context (%d); kept their last %d tokens",
                    n_cut, base.n_positions, keep)
    generator = None
    if strategy == "top_k":
        generator = torch.Generator(device=base.device)
        generator.manual_seed(seed)
    step_logits = _step_logits(base, head)
    order = sorted(range(len(clipped)), key=lambda i: len(clipped[i]))
    results: list[Generation | None] = [None] * len(clipped)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        rows = _generate_batch(base, [clipped[i] for i in idx], step_logits, strategy, top_k, max_new_tokens,
                               generator, end_ids)
        for i, (ids, reason) in zip(idx, rows, strict=True):
            text = base.tokenizer.decode(ids, skip_special_tokens=True)
            results[i] = Generation(token_ids=ids, text=text, finish_reason=reason, n_tokens=len(ids))
        if on_batch is not None:
            on_batch(len(idx))
    return [r for r in results if r is not None]


@torch.no_grad()
def target_cross_entropy(base: Base, encoded: Sequence[tuple[list[int], int]], head: HeadModule | None = None,
                         batch_size: int = 16) -> tuple[float, int]:
    """Teacher-forced (summed NLL in nats, number of target tokens) over `encode()`d examples.

    The logits at position t score token t + 1, as in causal-LM training; only target tokens
    (labels != -100) count. Only hidden states that score a target go through the head, so a
    big vocabulary never materialises (B, T, V) logits.
    """
    total, count = 0.0, 0
    pad = _pad_id(base)
    for start in range(0, len(encoded), batch_size):
        input_ids, mask, labels = collate(list(encoded[start: start + batch_size]), pad)
        input_ids, mask, labels = input_ids.to(base.device), mask.to(base.device), labels.to(base.device)
        hidden = base.hidden_states(input_ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        targets = labels[:, 1:]  # (B, T-1): the token each position predicts
        scored = targets != -100
        h = hidden[:, :-1][scored]  # (N, D)
        if h.shape[0] == 0:
            continue
        if head is None:
            logits = base.linear_logits(h)  # (N, V)
        else:
            logits = head(h[None], base.embeddings)[0]  # (1, N, D) -> (N, V)
        total += float(F.cross_entropy(logits.float(), targets[scored], reduction="sum"))
        count += int(scored.sum())
    return total, count
