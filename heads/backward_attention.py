"""The backward-attention head: the vocabulary attends to itself, weighted by the base's logits.

Notation (DESIGN.md): E (V, D) tied embeddings, h_t (D) final hidden state, z_t = E h_t (V).

    X   = RMSNorm(E) [W_L]                 (V, L)
    K   = X W_K,  U = X W_V                (V, H*d)
    u_t = z_t^T U / V   or  softmax(z_t)^T U
    q_t = u_t W_Q                          (H*d)
    s_t = sum_h K_h q_{t,h} / sqrt(d)      (V)   [+ alpha * z_t with the residual]

`forward` computes exactly this (the reference). `prepare` + `decode` is the inference path:
for "logits" weighting z_t^T U = h_t^T (E^T U), so F = E^T U / V W_Q (D, H*d) and K are cached
and a step costs one (V, H*d) product instead of two plus the base LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.registry import HeadModule, positive_int, register_head

WEIGHTINGS = ("logits", "probs")
MAX_WIDTH_PER_EMBD = 4  # latent_dim and num_heads * head_dim may be at most this many times the base's width



@dataclass
class BackwardAttentionConfig:
    latent_dim: int | None = 64  # L: project the vocabulary to this width first; None keeps D (bigger head)
    num_heads: int = 2  # H: attention heads over the vocabulary
    head_dim: int | None = None  # d: width per head; None means latent width // num_heads
    weighting: str = "logits"  # "logits" (the paper's z/V, foldable) or "probs" (softmax(z), not foldable)
    residual: bool = True  # add alpha * base logits so training starts from the base distribution
    chunk_size: int | None = None  # vocabulary rows per chunk in forward(); bounds memory on big vocabularies
    eps: float = 1e-6  # RMSNorm epsilon

    def validate(self) -> None:
        """Raise ValueError naming the first bad field; called before any tensor is built."""
        if self.latent_dim is not None and not positive_int(self.latent_dim):
            raise ValueError(f"latent_dim must be a positive integer or null, got {self.latent_dim!r}")
        if not positive_int(self.num_heads):
            raise ValueError(f"num_heads must be a positive integer, got {self.num_heads!r}")
        if self.head_dim is not None and not positive_int(self.head_dim):
            raise ValueError(f"head_dim must be a positive integer or null, got {self.head_dim!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not isinstance(self.residual, bool):
            raise ValueError(f"residual must be true or false, got {self.residual!r}")
        if self.chunk_size is not None and not positive_int(self.chunk_size):
            raise ValueError(f"chunk_size must be a positive integer or null, got {self.chunk_size!r}")
        if not isinstance(self.eps, float) or not 0 < self.eps < math.inf:
            raise ValueError(f"eps must be a positive float, got {self.eps!r}")

    def widths(self, n_embd: int) -> tuple[int, int, int]:
        """(L, d, H*d) on a base of width D: the latent width, the width per head and the attention width."""
        latent = self.latent_dim or n_embd
        head_dim = self.head_dim or max(1, latent // self.num_heads)
        return latent, head_dim, self.num_heads * head_dim

    def parameter_count(self, vocab_size: int, n_embd: int) -> int:
        """Parameters this config implies on a (V, D) base; ValueError past the bounds. Arithmetic only, so a
        config naming absurd sizes is refused before any tensor exists.

        Bounds: L and H*d at most MAX_WIDTH_PER_EMBD * D. Past D they add cost, not capacity (X = RMSNorm(E) W_L
        has rank <= D, and so has the head's correction of the LM head), and serving materialises K, (V, H*d):
        at 4 D that is four times the base's embedding matrix, the most a head may cost.
        """
        latent, _, inner = self.widths(n_embd)
        limit = MAX_WIDTH_PER_EMBD * n_embd
        if latent > limit:
            raise ValueError(f"latent_dim {latent} is over the bound {limit} ({MAX_WIDTH_PER_EMBD} x n_embd {n_embd})")
        if inner > limit:
            raise ValueError(f"num_heads x head_dim = {inner} is over the bound {limit} "
                             f"({MAX_WIDTH_PER_EMBD} x n_embd {n_embd})")
        projection = n_embd * latent if self.latent_dim else 0  # W_L
        # g, W_L, W_K and W_V, W_Q, alpha
        return n_embd + projection + 2 * latent * inner + inner * inner + int(self.residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class BackwardAttentionHead(HeadModule):
    head_type = "backward_attention"
    config: BackwardAttentionConfig

    def __init__(self, config: BackwardAttentionConfig | None = None, *, vocab_size: int, n_embd: int) -> None:
        super().__init__()
        config = config or BackwardAttentionConfig()
        self._take_config(config, vocab_size, n_embd)
        latent, self.head_dim, inner = config.widths(n_embd)  # L, d, H*d
        self.norm = RMSNorm(n_embd, config.eps)
        self.latent = nn.Linear(n_embd, latent, bias=False) if config.latent_dim else None
        self.key = nn.Linear(latent, inner, bias=False)
        self.value = nn.Linear(latent, inner, bias=False)
        self.query = nn.Linear(inner, inner, bias=False)
        self.alpha = nn.Parameter(torch.ones(())) if config.residual else None
        for lin in (self.latent, self.key, self.value, self.query):
            if lin is not None:
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        if config.residual:
            # LoRA-style: attention contributes nothing at step 0, so the head starts as the base.
            nn.init.zeros_(self.query.weight)
        self._key_cache: Tensor | None = None  # (V, H*d)
        self._fold: Tensor | None = None  # (D, H*d): E^T U / V W_Q ("logits" weighting only)
        self._value_cache: Tensor | None = None  # (V, H*d), "probs" weighting only
        self._embeddings: Tensor | None = None  # (V, D), needed for the residual or "probs"

    def _keys_values(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm(embeddings)  # (c, D)
        if self.latent is not None:
            x = self.latent(x)  # (c, L)
        return self.key(x), self.value(x)  # (c, H*d) each

    def _chunks(self, embeddings: Tensor) -> list[Tensor]:
        size = self.config.chunk_size or embeddings.shape[0]
        return list(embeddings.split(size, dim=0))

    def _check(self, hidden: Tensor, embeddings: Tensor) -> None:
        if embeddings.shape != (self.vocab_size, self.n_embd):
            raise ValueError(f"embeddings must be ({self.vocab_size}, {self.n_embd}), got {tuple(embeddings.shape)}")
        if hidden.shape[-1] != self.n_embd:
            raise ValueError(f"hidden size must be {self.n_embd}, got {hidden.shape[-1]}")

    def forward(self, hidden: Tensor, embeddings: Tensor) -> Tensor:
        """(B, T, D) hidden states and (V, D) embeddings -> (B, T, V) logits; the reference path."""
        self._check(hidden, embeddings)
        embeddings = embeddings.to(hidden.dtype)
        z = hidden @ embeddings.T  # (B, T, V) base logits
        weights = z / self.vocab_size if self.config.weighting == "logits" else z.softmax(-1)
        keys, u = [], hidden.new_zeros(*hidden.shape[:-1], self.query.in_features)  # (B, T, H*d)
        start = 0
        for chunk in self._chunks(embeddings):
            k, v = self._keys_values(chunk)  # (c, H*d)
            u = u + weights[..., start: start + chunk.shape[0]] @ v  # (B, T, H*d)
            keys.append(k)
            start += chunk.shape[0]
        q = self.query(u)  # (B, T, H*d)
        # sum_h K_h q_h over heads is the dot product over the concatenated H*d width.
        s = torch.cat([q @ k.T for k in keys], dim=-1) / math.sqrt(self.head_dim)  # (B, T, V)
        return s + self.alpha * z if self.alpha is not None else s

    @property
    def accepts_base_logits(self) -> bool:
        """decode() uses the base's logits (residual or "probs"), so a caller that has them can pass them."""
        return self.config.residual or self.config.weighting == "probs"

    @torch.no_grad()
    def prepare(self, embeddings: Tensor) -> None:
        """Cache K and the fold for `decode`; call again whenever weights or embeddings change."""
        self._check(embeddings.new_zeros(1, self.n_embd), embeddings)
        # detach(): assigning the base's nn.Parameter would register it as this head's own parameter.
        # The head keeps a reference to the base's matrix, never a copy in its own dtype (a float32
        # copy of a half-precision GPT-2's embeddings would be 154 MB per resident head).
        shared = embeddings.detach()
        embeddings = shared.to(self.key.weight.dtype)
        parts = [self._keys_values(chunk) for chunk in self._chunks(embeddings)]
        keys = torch.cat([k for k, _ in parts])  # (V, H*d)
        values = torch.cat([v for _, v in parts])  # (V, H*d)
        self._key_cache = keys / math.sqrt(self.head_dim)
        if self.config.weighting == "logits":
            self._fold = self.query((embeddings.T @ values) / self.vocab_size)  # (D, H*d)
            self._value_cache = None
        else:
            self._fold, self._value_cache = None, values
        needs_embeddings = self.config.residual or self.config.weighting == "probs"
        self._embeddings = shared if needs_embeddings else None

    @torch.no_grad()
    def decode(self, hidden_last: Tensor, base_logits: Tensor | None = None) -> Tensor:
        """(B, D) last hidden states -> (B, V) logits, equal to forward() on the same inputs.

        `base_logits` (B, V), the base's own logits for these rows, may be passed by a caller that
        has them anyway (a server computes them once per step for every head in the batch); the
        head then skips its own V x D product.
        """
        if self._key_cache is None:
            raise RuntimeError("call prepare(embeddings) before decode()")
        hidden_last = hidden_last.to(self._key_cache.dtype)
        z = None
        if self._embeddings is not None:  # (B, V), needed by the residual or "probs" weighting
            if base_logits is None:
                base_logits = hidden_last.to(self._embeddings.dtype) @ self._embeddings.T
            z = base_logits.to(hidden_last.dtype)
        if self._fold is not None:
            q = hidden_last @ self._fold  # (B, H*d)
        else:
            assert z is not None and self._value_cache is not None  # "probs": prepare() kept values and embeddings
            q = self.query(F.softmax(z, dim=-1) @ self._value_cache)  # (B, H*d)
        s = q @ self._key_cache.T  # (B, V)
        if self.alpha is None:
            return s
        assert z is not None  # the residual: prepare() kept the embeddings
        return s + self.alpha * z

    def release(self) -> None:
        """Drop the inference caches (the training loop calls this after an optimiser step)."""
        self._key_cache = self._fold = self._value_cache = self._embeddings = None

    def train(self, mode: bool = True) -> BackwardAttentionHead:
        if mode:
            self.release()  # caches would go stale as soon as weights move
        return super().train(mode)


register_head("backward_attention", BackwardAttentionConfig, BackwardAttentionHead)
