"""A backward-attention head in factored form: resident in kilobytes, ready in milliseconds.

A prepared head (`BackwardAttentionHead.prepare`) materialises its keys K (V x H*d): 13 MB and a
V x D x L product (~0.3-0.6 s on 2 cores) for GPT-2-124M. That is the fastest decode for a head
that serves many tokens, and the wrong trade for a long tail of heads used once each: loading
would cost more than decoding. The algebra of the head (DESIGN.md, "logits" weighting) lets us
skip K entirely. With r_v = 1/rms(E_v) (one scalar per vocabulary row, shared by all heads) and
A_K = diag(g) W_L^T W_K^T (D x H*d, per head):

    K q / sqrt(d) = r * (E (A_K q / sqrt(d)))      -- so with w = A_K q / sqrt(d):  s = r * (E w)
    fold F       = (E^T diag(r) E) A_V W_Q^T / V   -- the D x D Gram matrix is shared too

so a head keeps two D x H*d matrices, and its logits need E w: the same matrix product as the
base's own logits z = E h. The engine stacks every factored row's w under the hidden states and
runs the base's LM head once for all of them, so a step with 30 distinct heads costs one shared
V x D product, not 30 V x H*d ones. `HeadCache` serves a head in this form first and
materialises K once the head is used again.
"""

from __future__ import annotations

import math
import threading
from typing import TypeGuard

import torch
from torch import Tensor

from heads.backward_attention import BackwardAttentionHead
from heads.registry import HeadModule


class SharedNorms:
    """Per-base quantities every factored head needs, computed once per RMSNorm epsilon."""

    def __init__(self, embeddings: Tensor) -> None:
        self.embeddings = embeddings.detach()  # (V, D), the base's own matrix (not a copy)
        self._by_eps: dict[float, tuple[Tensor, Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, eps: float) -> tuple[Tensor, Tensor]:
        """(r (V,), Gram E^T diag(r) E (D, D)) in float32."""
        with self._lock:
            if eps not in self._by_eps:
                e = self.embeddings.float()
                r = torch.rsqrt(e.pow(2).mean(-1) + eps)  # (V,)
                self._by_eps[eps] = (r, e.T @ (e * r[:, None]))
            return self._by_eps[eps]


class FactoredHead:
    """Decode-only view of a "logits"-weighting BackwardAttentionHead; see the module docstring."""

    def __init__(self, head: BackwardAttentionHead, norms: SharedNorms) -> None:
        if head.config.weighting != "logits":
            raise ValueError("only 'logits' weighting factors; 'probs' needs softmax(z) @ U per row")
        with torch.no_grad():
            r, gram = norms.get(head.config.eps)
            mix = torch.diag(head.norm.weight)  # (D, D)
            if head.latent is not None:
                mix = mix @ head.latent.weight.T  # (D, L)
            a_k = mix @ head.key.weight.T  # (D, H*d)
            a_v = mix @ head.value.weight.T  # (D, H*d)
            self.fold = (gram @ a_v) @ head.query.weight.T / head.vocab_size  # (D, H*d)
            self.expand = a_k.T.contiguous() / math.sqrt(head.head_dim)  # (H*d, D)
            self.alpha = float(head.alpha) if head.alpha is not None else None
        self.scale = r  # (V,), shared by every head with this epsilon
        self.head = head  # kept so the cache can materialise K later without reading the files again

    def project(self, hidden: Tensor) -> Tensor:
        """(B, D) hidden states -> (B, D) vectors w whose product with E gives the attention logits."""
        hidden = hidden.to(self.fold.dtype)
        return (hidden @ self.fold) @ self.expand

    @property
    def accepts_base_logits(self) -> bool:
        return self.alpha is not None  # the residual adds the base's logits

    def combine(self, projected_logits: Tensor, base_logits: Tensor | None) -> Tensor:
        """E w (B, V) and, for a residual head, E h (B, V) -> the head's (B, V) logits."""
        s = projected_logits.float() * self.scale
        if self.alpha is None:
            return s
        assert base_logits is not None, "a residual head needs the base's logits"
        return s + self.alpha * base_logits.float()

    def decode(self, hidden: Tensor, embeddings: Tensor) -> Tensor:
        """(B, D) -> (B, V) logits on their own, for checks; the engine batches project/combine instead."""
        emb = embeddings.to(self.fold.dtype)
        return self.combine(self.project(hidden) @ emb.T, hidden.to(emb.dtype) @ emb.T)

    def resident_bytes(self) -> int:
        """What this head adds on the device (the shared scale is not counted)."""
        return sum(t.nbytes for t in (self.fold, self.expand))


def factorable(module: HeadModule) -> TypeGuard[BackwardAttentionHead]:
    """Only "logits" weighting folds into the factored form (see the module docstring)."""
    return isinstance(module, BackwardAttentionHead) and module.config.weighting == "logits"


ServingHead = HeadModule | FactoredHead  # a head ready to decode: prepared, or in factored form
