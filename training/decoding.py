"""Decoding on the frozen base with a swappable output head, as the server decodes, and teacher-forced scoring.

`generate` is evaluation's front end to `runtime.batch_decode`: the server's ragged runner, shared
LM-head product and sampling, continuously batched. So a greedy row's tokens are exactly what the
server returns for the same prompt and head, and a sampled example's are what the server returns for
a request with the example's seed (`example_seed`). `target_cross_entropy` scores reference solutions
with the base's own forward (teacher forcing needs every position, not a decode loop).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from heads import HeadModule
from heads.base import Base
from heads.sampling import SamplingParams
from runtime.batch_decode import DecodeResult, decode
from training.data import collate

Strategy = Literal["greedy", "top_k", "top_p"]
STRATEGIES = ("greedy", "top_k", "top_p")


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


def example_seed(seed: int, index: int) -> int:
    """The seed of example `index`'s own generator in a run seeded with `seed`.

    A hash of the pair, not `seed + index`, with which run s + 1 would reuse run s's generators one example
    over, so runs meant as independent repeats would not be. It depends on nothing else, so an example draws
    the same tokens however the run is batched and whatever other examples are in it, and exactly what the
    server draws for a request with `"seed": example_seed(seed, index)` (63 bits: within the server's bound).
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def generate(base: Base, prompts: Sequence[Sequence[int]], *, head: HeadModule | None = None,
             strategy: Strategy = "greedy", top_k: int = 50, top_p: float = 0.9, temperature: float = 1.0,
             max_new_tokens: int = 128, seed: int = 0, batch_size: int = 32,
             on_batch: Callable[[int], Any] | None = None, end_ids: Sequence[int] | None = None) -> list[Generation]:
    """Continue each prompt (token ids) with the base plus `head` (None: the base's own LM head).

    A row ends at any of `end_ids` (default: the tokenizer's EOS; a chat prompt's also ends at its
    template's end-of-turn token, `heads.prompts.PromptStyle.end_ids`), or when its `max_new_tokens`
    or the base context runs out, as on the server. Up to `batch_size` rows decode together; a finished
    row's place goes to the next prompt at once. Sampling (top-k, top-p, at `temperature`) draws example
    i with its own generator seeded with `example_seed(seed, i)`.
    A prompt longer than the context keeps its last `n_positions - 1` tokens (logged).
    `on_batch(1)` is called as each example finishes (progress bars).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    params = SamplingParams(strategy=strategy, top_k=top_k, top_p=top_p, temperature=temperature)
    params.validate()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if end_ids is None:
        eos = base.tokenizer.eos_token_id
        end_ids = () if eos is None else (int(eos),)
    if head is not None:
        head.prepare(base.embeddings)

    def done(_: int, __: DecodeResult) -> None:
        if on_batch is not None:
            on_batch(1)

    results = decode(base, prompts, head=head, params=params, seed=[example_seed(seed, i) for i in range(len(prompts))],
                     max_new_tokens=max_new_tokens, end_ids=end_ids, max_batch=batch_size, on_done=done)
    return [Generation(token_ids=r.token_ids, text=base.tokenizer.decode(r.token_ids, skip_special_tokens=True),
                       finish_reason=r.finish_reason.value, n_tokens=r.n_tokens) for r in results]


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
