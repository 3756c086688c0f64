"""Offline continuous batching: decode many prompts through the server's own runner, logits and sampling.

Evaluation must measure what the server serves. So this loop does nothing its own way: each step is
one ragged runner forward (`runtime.runners`) over every active row plus the prompts of the rows that
join, the step's logits come from `runtime.head_logits.group_logits` (one group: every row shares the
head), and tokens from `heads.sampling.sample`. A row's budget (`new_token_budget`), its generator
(`make_generator(seed)`, for sampling rows only) and when it ends (an end id, else its budget) are the
engine's rules, so row i's tokens are the ones the server returns for a request of prompt i with seed
`seeds[i]`, whatever else shares the batch.

Like the engine (server/engine.py), up to `max_batch` rows live in the slot KV cache: row s in slot s.
A finished row leaves at the end of its step and the last row moves into its slot, and waiting prompts
join at the next step, in input order, so the batch stays full until the queue runs dry. What the engine
adds on top (requests, stop strings, streaming, isolating one request's failure from the others) is not
needed offline: an error here ends the whole call.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from heads.base import Base
from heads.factored import ServingHead
from heads.sampling import FinishReason, SamplingParams, make_generator, sample
from runtime.head_logits import group_logits
from runtime.runners import Prefill, Runner, SlotKVCache, runner_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeResult:
    token_ids: list[int]  # generated ids, including the end id that finished the row (if one did)
    finish_reason: FinishReason  # eos (an end id) or length (max_new_tokens or the base context ran out)

    @property
    def n_tokens(self) -> int:
        """Every token the model produced, the end id included."""
        return len(self.token_ids)


def new_token_budget(n_positions: int, prompt_length: int, max_new_tokens: int) -> int:
    """Tokens a row may generate: the whole sequence must fit the base context, yet every prompt gets one."""
    return max(1, min(max_new_tokens, n_positions - prompt_length))


@dataclass
class _Row:
    index: int  # position in the caller's prompts
    prompt: list[int]
    budget: int  # new_token_budget
    generator: torch.Generator | None  # sampling rows only, as the server's sequences
    cached: int = 0  # tokens whose keys/values sit in the row's slot
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


def clip_prompts(prompts: Sequence[Sequence[int]], n_positions: int) -> list[list[int]]:
    """Each prompt as a list, a longer one than the context cut to its last `n_positions - 1` tokens (logged)."""
    keep = n_positions - 1
    clipped = [list(p)[-keep:] for p in prompts]
    if any(len(p) == 0 for p in clipped):
        raise ValueError("every prompt needs at least one token")
    n_cut = sum(len(p) > keep for p in prompts)
    if n_cut:
        log.warning("%d prompt(s) longer than the base context (%d); kept their last %d tokens", n_cut, n_positions,
                    keep)
    return clipped


def decode(base: Base, prompts: Sequence[Sequence[int]], *, head: ServingHead | None = None,
           params: SamplingParams, seed: int | Sequence[int] = 0, max_new_tokens: int,
           end_ids: Collection[int], max_batch: int = 32,
           on_done: Callable[[int, DecodeResult], object] | None = None) -> list[DecodeResult]:
    """Continue every prompt (token ids) with the base and `head`; results in input order.

    `head`: ready to decode (`prepare`d, or a FactoredHead); None is the base's own LM head. `seed`: one per
    prompt, or one for all; only sampling rows use it. `end_ids`: the tokens that end a row, EOS among them
    (`heads.prompts.end_ids` gives a prompt format's). `on_done(i, result)` is called as prompt i finishes.
    """
    params.validate()
    if max_new_tokens < 1 or max_batch < 1:
        raise ValueError(f"max_new_tokens and max_batch must be >= 1, got {max_new_tokens} and {max_batch}")
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if not prompts:
        return []
    ends = frozenset(int(t) for t in end_ids)
    waiting = collections.deque(
        _Row(index=i, prompt=p, budget=new_token_budget(base.n_positions, len(p), max_new_tokens),
             generator=None if params.is_greedy else make_generator(seeds[i], base.device))
        for i, p in enumerate(clip_prompts(prompts, base.n_positions)))
    runner = runner_for(base.model)
    cache = runner.new_cache(min(max_batch, len(waiting)))
    active: list[_Row] = []  # active[s] lives in cache slot s
    results: list[DecodeResult | None] = [None] * len(prompts)
    try:
        while waiting or active:
            joining = [waiting.popleft() for _ in range(min(max_batch - len(active), len(waiting)))]
            hidden = _forward(runner, cache, active, joining)  # (len(active) + len(joining), D)
            active += joining
            _draw(base, hidden, head, active, params, ends)
            for slot in range(len(active) - 1, -1, -1):  # backwards: the row moved into a freed slot is done
                row = active[slot]
                if row.finish_reason is not None:
                    _leave(cache, active, slot)
                    result = results[row.index] = DecodeResult(row.token_ids, row.finish_reason)
                    if on_done is not None:
                        on_done(row.index, result)
    finally:
        cache.release()
    return [r for r in results if r is not None]


def _forward(runner: Runner, cache: SlotKVCache, active: list[_Row], joining: list[_Row]) -> Tensor:
    """One runner step: each active row feeds its newest token, each joining row its prompt (into the next slot)."""
    cache.ensure(max([row.cached + 1 for row in active] + [len(row.prompt) for row in joining]))
    prefills = [Prefill(row.prompt, [len(active) + j]) for j, row in enumerate(joining)]
    hidden = runner.step(cache, [row.token_ids[-1] for row in active], [row.cached for row in active], prefills)
    for row in active:
        row.cached += 1
    for row in joining:
        row.cached = len(row.prompt)
    return hidden


@torch.no_grad()
def _draw(base: Base, hidden: Tensor, head: ServingHead | None, rows: list[_Row], params: SamplingParams,
          ends: frozenset[int]) -> None:
    """One token per row: one argmax for a greedy batch, else each row's own draw with its own generator."""
    ((_, logits),) = group_logits(base, hidden, [head] * len(rows), [list(range(len(rows)))])  # (N, V)
    if isinstance(logits, Exception):
        raise logits
    if params.is_greedy:
        tokens = sample(logits, params)[0].tolist()
    else:
        tokens = [int(sample(logits[i:i + 1], params, row.generator)[0]) for i, row in enumerate(rows)]
    for row, token in zip(rows, tokens, strict=True):
        row.token_ids.append(token)
        if token in ends:
            row.finish_reason = FinishReason.eos
        elif len(row.token_ids) >= row.budget:
            row.finish_reason = FinishReason.length


def _leave(cache: SlotKVCache, active: list[_Row], slot: int) -> None:
    """Take the row in `slot` out of the batch; the last row moves into its slot, as the engine compacts."""
    last = len(active) - 1
    if slot != last:
        moved = active[last]
        cache.move(last, slot, moved.cached)
        active[slot] = moved
    active.pop()
