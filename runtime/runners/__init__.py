"""Ragged runners: one forward of a base over a ragged batch, chosen by the base's `config.model_type`.

Why not call the Hugging Face model: continuous batching needs sequences of different lengths to
join and leave between steps. With HF's padded caches every join means re-padding every layer's
cache and every decode row pays for the longest newcomer's prompt. A runner flattens all new tokens
of a step into one (N, D) matrix, so the token-wise work (norms, projections, MLPs: nearly all of
the cost) runs as one matmul per projection per layer whatever the mix; only attention is per
sequence, over a slot KV cache (`cache.py`, `attention.py`). Each architecture gets one runner that
reuses the model's own modules and weights; this module is the one place that maps types to runners.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor, nn

from heads.errors import UnsupportedBaseError
from runtime.runners.cache import POSITION_BLOCK, Prefill, SlotKVCache
from runtime.runners.gpt2 import RaggedGPT2
from runtime.runners.llama import RaggedLlama


class Runner(Protocol):
    """What the server's engine and the offline decode loop (runtime.batch_decode) ask of a runner."""

    n_positions: int  # the base's context: the cache never grows past it

    def new_cache(self, slots: int) -> SlotKVCache:
        """An empty slot cache shaped for this base (its layers, KV heads, head width, dtype and device)."""
        ...

    def step(self, cache: SlotKVCache, decode_ids: list[int], decode_lengths: list[int],
             prefills: list[Prefill]) -> Tensor:
        """Final hidden states (n_decode + len(prefills) + n_mean, D): decode row i feeds `decode_ids[i]` at
        position `decode_lengths[i]` from slot i; each prefill's prompt fills its slots and gives its last token's
        row; then each prefill with `mean` set gives the mean of its final hidden states over all its positions
        (in prefill order), what a mean-pooling classifier reads."""
        ...


RUNNERS: dict[str, Callable[[nn.Module], Runner]] = {
    **dict.fromkeys(RaggedGPT2.model_types, RaggedGPT2),
    **dict.fromkeys(RaggedLlama.model_types, RaggedLlama),
}


def supported_model_types() -> list[str]:
    """What an unsupported base's error lists, and what the docs promise."""
    return sorted(RUNNERS)


def runner_for(model: nn.Module) -> Runner:
    """The runner for `model` by its `config.model_type`; UnsupportedBaseError names the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    make = RUNNERS.get(model_type) if isinstance(model_type, str) else None
    if make is None:
        raise UnsupportedBaseError(f"the engine cannot run this base: model_type {model_type!r} "
                                   f"({type(model).__name__}) has no ragged runner; supported model types: "
                                   f"{', '.join(supported_model_types())}")
    return make(model)


__all__ = ["POSITION_BLOCK", "RUNNERS", "Prefill", "RaggedGPT2", "RaggedLlama", "Runner", "SlotKVCache",
           "UnsupportedBaseError", "runner_for", "supported_model_types"]
