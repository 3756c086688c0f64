"""The rank fact (DESIGN.md): the paper's backward-attention head, "logits" weighting, is the LM head plus a
low-rank correction, `alpha E h + M h` with rank(M) <= H*d and M's left factor tied to the normalised
embeddings; with "probs" weighting no matrix M makes it so.

Everything runs in float64, so "equal" means equal to ~1e-12, and M is built from the head's weights by hand,
not through any of the head's own methods.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from heads import BackwardAttentionConfig, BackwardAttentionHead

V, D = 97, 24  # V > D >= H*d in every case below, so a rank bound of H*d is a real constraint
# (latent_dim, num_heads, head_dim): H*d = 10, 12 and 8; L >= H*d, so the generic rank is exactly H*d
SHAPES = [(None, 2, 5), (16, 3, 4), (12, 2, 4)]


def random_head(latent_dim: int | None, num_heads: int, head_dim: int, residual: bool, weighting: str = "logits",
                seed: int = 0) -> BackwardAttentionHead:
    """Every weight random and nonzero (W_Q too, which the residual init zeroes), in float64."""
    torch.manual_seed(seed)
    config = BackwardAttentionConfig(latent_dim=latent_dim, num_heads=num_heads, head_dim=head_dim,
                                     weighting=weighting, residual=residual)
    head = BackwardAttentionHead(config, vocab_size=V, n_embd=D).double().eval()
    with torch.no_grad():
        for lin in (head.latent, head.key, head.value, head.query):
            if lin is not None:
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        head.norm.weight.copy_(1 + 0.3 * torch.randn(D, dtype=torch.float64))
        if head.alpha is not None:
            head.alpha.fill_(0.7)
    return head


def base_inputs(seed: int = 1, rows: int = 40) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, D, generator=gen, dtype=torch.float64),
            torch.randn(V, D, generator=gen, dtype=torch.float64))


def row_scale(head: BackwardAttentionHead, embeddings: Tensor) -> Tensor:
    """(V,) 1 / rms of each embedding row: RMSNorm(E) = diag(r) E diag(g)."""
    return torch.rsqrt(embeddings.pow(2).mean(-1) + head.config.eps)


@torch.no_grad()
def explicit_map(head: BackwardAttentionHead, embeddings: Tensor) -> Tensor:
    """M (V, D) with head(h) = alpha E h + M h, from the weights: M = K W_Q U^T E / (V sqrt(d)).

    Rows as the head computes them (nn.Linear stores W as (out, in), so DESIGN.md's W_Q is `query.weight.T`):
    u = z U / V = h E^T U / V, q = u query.weight^T, s = q K^T / sqrt(d) = h (E^T U query.weight^T K^T) / (V sqrt(d)),
    which is h M^T for the M returned here.
    """
    x = embeddings * row_scale(head, embeddings)[:, None] * head.norm.weight  # (V, D) RMSNorm(E)
    if head.latent is not None:
        x = x @ head.latent.weight.T  # (V, L)
    keys, values = x @ head.key.weight.T, x @ head.value.weight.T  # (V, H*d) each
    return keys @ head.query.weight @ values.T @ embeddings / (V * math.sqrt(head.head_dim))  # (V, D)


def attention_part(head: BackwardAttentionHead, hidden: Tensor, embeddings: Tensor) -> Tensor:
    """(N, V): the head's logits less the residual alpha E h (all of them without the residual)."""
    with torch.no_grad():
        out = head(hidden[:, None], embeddings)[:, 0]
    alpha = head.alpha.detach() if head.alpha is not None else 0.0
    return out - alpha * (hidden @ embeddings.T)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [True, False])
def test_logits_weighting_is_the_lm_head_plus_an_explicit_matrix(shape: tuple[int | None, int, int],
                                                                 residual: bool) -> None:
    head = random_head(*shape, residual=residual)
    hidden, embeddings = base_inputs()
    m = explicit_map(head, embeddings)
    alpha = float(head.alpha.detach()) if head.alpha is not None else 0.0
    with torch.no_grad():
        out = head(hidden[:, None], embeddings)[:, 0]  # (N, V)
    expected = alpha * hidden @ embeddings.T + hidden @ m.T
    assert out.abs().max() > 1 and (hidden @ m.T).abs().max() > 1e-2  # neither term is trivially small
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_correction_has_rank_num_heads_times_head_dim(shape: tuple[int | None, int, int]) -> None:
    head = random_head(*shape, residual=True)
    _, embeddings = base_inputs()
    m = explicit_map(head, embeddings)
    inner = head.config.num_heads * head.head_dim
    assert inner < min(V, D)  # the bound says something: a V x D matrix could have rank up to D
    assert int(torch.linalg.matrix_rank(m)) == inner  # <= H*d always; == H*d for generic weights
    singular = torch.linalg.svdvals(m)
    assert singular[inner - 1] > 1e-8 * singular[0] and singular[inner] < 1e-12 * singular[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_correction_s_left_factor_is_tied_to_the_normalised_embeddings(shape: tuple[int | None, int, int]
                                                                          ) -> None:
    """Every column of M lies in the span of diag(r) E's D columns (a D-dim subspace of R^V): M = diag(r) E C.
    A free (V, r) left factor, as the untied `lowrank` head has, does not."""
    head = random_head(*shape, residual=False)
    _, embeddings = base_inputs()
    m = explicit_map(head, embeddings)
    tied = embeddings * row_scale(head, embeddings)[:, None]  # (V, D)

    def off_span(matrix: Tensor) -> float:
        coef = torch.linalg.lstsq(tied, matrix).solution  # (D, D)
        return float((tied @ coef - matrix).norm() / matrix.norm())

    assert off_span(m) < 1e-10
    free = torch.randn(V, 4, dtype=torch.float64) @ torch.randn(4, D, dtype=torch.float64)  # rank 4, untied
    assert off_span(free) > 0.5


@pytest.mark.parametrize("weighting", ["logits", "probs"])
def test_only_logits_weighting_is_linear_in_the_hidden_state(weighting: str) -> None:
    """f(h) = head(h) - alpha E h. With "logits" f is additive, homogeneous and fitted exactly by a matrix from
    data; with "probs" (softmax of z) all three fail by a wide margin, so no M with f(h) = M h exists."""
    head = random_head(16, 3, 4, residual=True, weighting=weighting)
    hidden, embeddings = base_inputs(rows=200)  # 200 > D rows: a least-squares fit is overdetermined
    h1, h2 = hidden[:50], hidden[50:100]

    def f(h: Tensor) -> Tensor:
        return attention_part(head, h, embeddings)

    def relative(a: Tensor, b: Tensor) -> float:
        return float((a - b).norm() / b.norm())

    additivity = relative(f(h1 + h2), f(h1) + f(h2))
    homogeneity = relative(f(2.5 * h1), 2.5 * f(h1))
    outputs = f(hidden)  # (N, V)
    fitted = hidden @ torch.linalg.lstsq(hidden, outputs).solution  # the best f(h) = h M^T
    misfit = relative(fitted, outputs)
    if weighting == "logits":
        assert max(additivity, homogeneity, misfit) < 1e-10
    else:
        assert min(additivity, homogeneity, misfit) > 0.1
