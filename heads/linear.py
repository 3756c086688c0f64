"""The baseline head: a fresh, trainable copy of the base's LM head ("fine-tune the last layer")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from heads.registry import HeadModule, register_head


@dataclass
class LinearConfig:
    bias: bool = False  # GPT-2's LM head has none; a bias lets the baseline shift token priors cheaply

    def validate(self) -> None:
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be true or false, got {self.bias!r}")

    def parameter_count(self, vocab_size: int, n_embd: int) -> int:
        """A (V, D) matrix and the optional (V,) bias: the LM head's own size, so no bound of its own."""
        return vocab_size * n_embd + (vocab_size if self.bias else 0)


class LinearHead(HeadModule):
    head_type = "linear"
    config: LinearConfig

    def __init__(self, config: LinearConfig | None = None, *, vocab_size: int, n_embd: int) -> None:
        super().__init__()
        config = config or LinearConfig()
        self._take_config(config, vocab_size, n_embd)
        self.proj = nn.Linear(n_embd, vocab_size, bias=config.bias)
        nn.init.normal_(self.proj.weight, std=0.02)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def init_from(self, embeddings: Tensor) -> LinearHead:
        """Start from the base's own LM head (tied embeddings), so training refines rather than relearns."""
        if embeddings.shape != (self.vocab_size, self.n_embd):
            raise ValueError(f"embeddings must be ({self.vocab_size}, {self.n_embd}), got {tuple(embeddings.shape)}")
        self.proj.weight.copy_(embeddings)
        return self

    def forward(self, hidden: Tensor, embeddings: Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, T, V); `embeddings` is accepted for the shared head interface and unused."""
        return self.proj(hidden)

    def prepare(self, embeddings: Tensor | None = None) -> None:
        """Nothing to cache: the weights already are the folded form."""

    @torch.no_grad()
    def decode(self, hidden_last: Tensor, base_logits: Tensor | None = None) -> Tensor:
        """(B, D) -> (B, V); the base's logits are no input of this head (`accepts_base_logits` is False)."""
        return self.proj(hidden_last.to(self.proj.weight.dtype))

    def release(self) -> None:
        """Nothing cached."""


register_head("linear", LinearConfig, LinearHead)
