"""The low-rank control: the base's own LM head plus a trained rank-r correction.

With "logits" weighting the backward-attention head computes `alpha E h + M h` with rank(M) <= H*d and M's
left factor tied to the normalised, projected embeddings (DESIGN.md; tests/unit/test_head_algebra.py proves it).
This kind trains such a correction directly, with no attention form around it:

    tied:    s_t = alpha E h_t + E B A h_t      A (r, D), B (D, r)    2 D r + 1 parameters
    untied:  s_t = alpha E h_t + B A h_t        A (r, D), B (V, r)    r (V + D) + 1 parameters

At about a backward-attention head's parameter count (`matched_rank`) it separates "the attention form helps"
from "any low-rank correction of the LM head helps". B starts at zero (as in LoRA), so the head starts as the
base, like the backward-attention head with its residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from heads.registry import HeadModule, positive_int, register_head

PREPARE_ROWS = 8192  # vocabulary rows per product in prepare(): bounds the float32 copy of a half-precision E



@dataclass
class LowRankConfig:
    rank: int = 16  # r: width of the correction; past n_embd it adds cost, not capacity (rank(BA) <= D)
    tied: bool = True  # B maps back into the base's space and goes through E (as the backward-attention head's
    # keys do), or B is a free (V, r) matrix

    def validate(self) -> None:
        """Raise ValueError naming the first bad field; called before any tensor is built."""
        if not positive_int(self.rank):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.tied, bool):
            raise ValueError(f"tied must be true or false, got {self.tied!r}")

    def per_rank(self, vocab_size: int, n_embd: int) -> int:
        """Parameters each unit of rank costs: a row of A and a column of B."""
        return n_embd + (n_embd if self.tied else vocab_size)

    def parameter_count(self, vocab_size: int, n_embd: int) -> int:
        """A, B and alpha on a (V, D) base; ValueError for a rank past D. Arithmetic only, so a config naming an
        absurd rank is refused before any tensor exists."""
        if self.rank > n_embd:
            raise ValueError(f"rank {self.rank} is over the bound n_embd {n_embd} "
                             "(a correction B A of a D-wide state has rank at most D)")
        return self.rank * self.per_rank(vocab_size, n_embd) + 1


def matched_rank(vocab_size: int, n_embd: int, target_params: int, tied: bool = True) -> int:
    """The rank (1 to n_embd) whose head has the parameter count closest to `target_params` (the lower on a tie),
    e.g. a backward-attention head's `parameter_count`, so the two kinds compare at equal size."""
    for name, value in (("vocab_size", vocab_size), ("n_embd", n_embd), ("target_params", target_params)):
        if not positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    per_rank = LowRankConfig(tied=tied).per_rank(vocab_size, n_embd)
    low = min(n_embd, max(1, (target_params - 1) // per_rank))
    high = min(n_embd, low + 1)
    return min((low, high), key=lambda r: (abs(r * per_rank + 1 - target_params), r))


class LowRankHead(HeadModule):
    head_type = "lowrank"
    config: LowRankConfig

    def __init__(self, config: LowRankConfig | None = None, *, vocab_size: int, n_embd: int) -> None:
        super().__init__()
        config = config or LowRankConfig()
        self._take_config(config, vocab_size, n_embd)
        self.down = nn.Linear(n_embd, config.rank, bias=False)  # A: weight (r, D)
        self.up = nn.Linear(config.rank, n_embd if config.tied else vocab_size, bias=False)  # B: (D, r) or (V, r)
        self.alpha = nn.Parameter(torch.ones(()))  # scale of the base's logits, as the residual of backward attention
        nn.init.normal_(self.down.weight, std=n_embd ** -0.5)
        nn.init.zeros_(self.up.weight)  # the correction is zero at step 0: the head starts as the base
        self._embeddings: Tensor | None = None  # (V, D), the base's own matrix (a reference, not a copy)
        self._out: Tensor | None = None  # (V, r): E B (tied) or B (untied), the correction's output factor

    def _check(self, hidden: Tensor, embeddings: Tensor) -> None:
        if embeddings.shape != (self.vocab_size, self.n_embd):
            raise ValueError(f"embeddings must be ({self.vocab_size}, {self.n_embd}), got {tuple(embeddings.shape)}")
        if hidden.shape[-1] != self.n_embd:
            raise ValueError(f"hidden size must be {self.n_embd}, got {hidden.shape[-1]}")

    def forward(self, hidden: Tensor, embeddings: Tensor) -> Tensor:
        """(B, T, D) hidden states and (V, D) embeddings -> (B, T, V) logits; the reference path.

        The tied form needs one V x D product for both terms: E (alpha h + B A h)."""
        self._check(hidden, embeddings)
        hidden = hidden.to(self.alpha.dtype)  # hidden states cached in 16 bits meet float32 weights
        embeddings = embeddings.to(self.alpha.dtype)
        low = self.down(hidden)  # (B, T, r)
        if self.config.tied:
            return (self.alpha * hidden + self.up(low)) @ embeddings.T  # (B, T, V)
        return self.alpha * (hidden @ embeddings.T) + self.up(low)  # (B, T, V)

    @property
    def accepts_base_logits(self) -> bool:
        """decode() adds alpha times the base's logits, so a caller that has them saves it a V x D product."""
        return True

    @torch.no_grad()
    def prepare(self, embeddings: Tensor) -> None:
        """Keep the base's embeddings (by reference) and the correction's (V, r) output factor for `decode`."""
        self._check(embeddings.new_zeros(1, self.n_embd), embeddings)
        # detach(): assigning the base's nn.Parameter would register it as this head's own parameter.
        shared = embeddings.detach()
        b = self.up.weight  # (D, r) or (V, r)
        if self.config.tied:  # E B in chunks: a half-precision E is never copied whole into float32
            self._out = torch.cat([rows.to(b.dtype) @ b for rows in shared.split(PREPARE_ROWS)])  # (V, r)
        else:
            self._out = b.detach()  # (V, r), the weight itself
        self._embeddings = shared

    @torch.no_grad()
    def decode(self, hidden_last: Tensor, base_logits: Tensor | None = None) -> Tensor:
        """(B, D) last hidden states -> (B, V) logits, equal to forward() on the same inputs.

        Given the base's (B, V) logits the head adds only a (V, r) product; without them the tied form
        still needs only one V x D product, E (alpha h + B A h)."""
        if self._embeddings is None or self._out is None:
            raise RuntimeError("call prepare(embeddings) before decode()")
        hidden = hidden_last.to(self.alpha.dtype)
        low = self.down(hidden)  # (B, r)
        if base_logits is not None:
            return self.alpha * base_logits.to(hidden.dtype) + low @ self._out.T  # (B, V)
        emb = self._embeddings
        if self.config.tied:
            mixed = self.alpha * hidden + self.up(low)  # (B, D)
            return (mixed.to(emb.dtype) @ emb.T).to(hidden.dtype)  # (B, V)
        z = (hidden.to(emb.dtype) @ emb.T).to(hidden.dtype)  # (B, V), the base's logits
        return self.alpha * z + low @ self._out.T

    def release(self) -> None:
        """Drop what prepare() kept (the training loop calls this after an optimiser step)."""
        self._embeddings = self._out = None

    def train(self, mode: bool = True) -> LowRankHead:
        if mode:
            self.release()  # E B would go stale as soon as B moves
        return super().train(mode)


register_head("lowrank", LowRankConfig, LowRankHead)
