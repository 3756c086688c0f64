"""LowRankHead, the parameter-matched control: it starts as the base, decodes as it trains, sizes itself by
arithmetic, and survives the head folder format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import heads.storage as storage
from heads import (
    BackwardAttentionConfig,
    HeadFormatError,
    LowRankConfig,
    LowRankHead,
    get_head_type,
    load_head,
    matched_rank,
    save_head,
)
from heads.storage import max_head_parameters

V, D = 97, 24
BASE_INFO = {"base_model_name_or_path": "tiny/base", "base_fingerprint": "sha256:" + "cd" * 32}


def make_inputs(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, D, generator=gen), torch.randn(V, D, generator=gen)


def trained_like(tied: bool, rank: int = 6, seed: int = 0) -> LowRankHead:
    """A head whose correction is nonzero and alpha is not 1, as after training."""
    torch.manual_seed(seed)
    head = LowRankHead(LowRankConfig(rank=rank, tied=tied), vocab_size=V, n_embd=D)
    with torch.no_grad():
        nn.init.normal_(head.up.weight, std=0.3)
        head.alpha.fill_(0.8)
    return head.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_decode_equals_forward_with_and_without_the_base_logits(tied: bool) -> None:
    head = trained_like(tied)
    hidden, emb = make_inputs()
    with torch.no_grad():
        full = head(hidden, emb)  # (3, 5, V)
        base = hidden @ emb.T
    assert (full - base).abs().max() > 0.1  # the correction changes the logits
    head.prepare(emb)
    rows = hidden.reshape(-1, D)
    plain = head.decode(rows).reshape(3, 5, V)
    given = head.decode(rows, base_logits=rows @ emb.T).reshape(3, 5, V)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, full, rtol=0, atol=1e-4)
    torch.testing.assert_close(given, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_a_new_head_is_the_base(tied: bool) -> None:
    head = LowRankHead(LowRankConfig(rank=8, tied=tied), vocab_size=V, n_embd=D).eval()
    hidden, emb = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(head(hidden, emb), hidden @ emb.T)
    head.prepare(emb)
    torch.testing.assert_close(head.decode(hidden[:, -1]), hidden[:, -1] @ emb.T)


@pytest.mark.parametrize("tied", [True, False])
def test_training_moves_b_first_then_a_and_never_the_base(tied: bool) -> None:
    """B starts at zero, so the first gradient reaches B and alpha but not A (as in LoRA); after one step A's
    gradient is nonzero too. The base's embeddings get no gradient."""
    head = LowRankHead(LowRankConfig(rank=4, tied=tied), vocab_size=V, n_embd=D)
    hidden, emb = make_inputs()
    emb.requires_grad_(False)
    target = torch.randint(0, V, (15,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(head.parameters(), lr=0.5)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(head(hidden, emb).reshape(-1, V), target).backward()

    step()
    assert head.up.weight.grad is not None and head.up.weight.grad.abs().max() > 0
    assert head.alpha.grad is not None and head.alpha.grad.abs() > 0
    assert head.down.weight.grad is not None and head.down.weight.grad.abs().max() == 0
    opt.step()
    step()
    assert head.down.weight.grad.abs().max() > 0
    assert emb.grad is None


def test_train_drops_the_stale_caches() -> None:
    head = trained_like(tied=True)
    hidden, emb = make_inputs()
    head.prepare(emb)
    head.train()
    with pytest.raises(RuntimeError, match="prepare"):
        head.decode(hidden[:, -1])


def test_prepare_keeps_a_reference_to_the_base_embeddings_not_a_copy() -> None:
    head = trained_like(tied=False)
    embeddings = nn.Parameter(make_inputs()[1], requires_grad=False)
    names = sorted(head.state_dict())
    head.prepare(embeddings)
    assert sorted(head.state_dict()) == names
    assert all(p is not embeddings for p in head.parameters())
    assert head._embeddings is not None and head._embeddings.data_ptr() == embeddings.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_a_half_precision_base_decodes_close_to_float32(tied: bool, dtype: torch.dtype) -> None:
    head = trained_like(tied)
    hidden, emb = make_inputs()
    with torch.no_grad():
        reference = head(hidden[:, -1:], emb)[:, 0]
    head.prepare(emb.to(dtype))
    out = head.decode(hidden[:, -1].to(dtype))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("rank", [1, 5, D])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_what_the_module_allocates(tied: bool, rank: int) -> None:
    config = LowRankConfig(rank=rank, tied=tied)
    head = LowRankHead(config, vocab_size=V, n_embd=D)
    assert config.parameter_count(V, D) == sum(p.numel() for p in head.parameters())
    assert config.parameter_count(V, D) == (2 * D * rank if tied else rank * (V + D)) + 1
    assert config.parameter_count(V, D) <= max_head_parameters(V, D)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("target", [1, 50, 700, 1000, 2_113, 10**9])
def test_matched_rank_picks_the_closest_parameter_count(tied: bool, target: int) -> None:
    rank = matched_rank(V, D, target, tied=tied)
    counts = {r: LowRankConfig(rank=r, tied=tied).parameter_count(V, D) for r in range(1, D + 1)}
    best = min(abs(c - target) for c in counts.values())
    assert abs(counts[rank] - target) == best
    assert rank == min(r for r, c in counts.items() if abs(c - target) == best)  # the lower on a tie


def test_matched_rank_matches_a_backward_attention_head() -> None:
    ba = BackwardAttentionConfig(latent_dim=8, num_heads=2).parameter_count(V, D)
    assert ba == D + D * 8 + 2 * 8 * 8 + 8 * 8 + 1 == 409  # g, W_L, W_K and W_V, W_Q, alpha
    assert matched_rank(V, D, ba) == 8  # 2 * 24 * 8 + 1 = 385 and 433 for rank 9: a tie, the lower wins
    assert matched_rank(V, D, ba, tied=False) == 3  # 3 * 121 + 1 = 364, against 485 for rank 4
    assert matched_rank(V, D, ba + 30) == 9  # 433 is now the closer
    with pytest.raises(ValueError, match="target_params"):
        matched_rank(V, D, 0)


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"rank": 0}, "rank must be a positive integer"), ({"rank": -3}, "rank must be a positive integer"),
    ({"rank": True}, "rank must be a positive integer"), ({"rank": 2.5}, "rank must be a positive integer"),
    ({"rank": "8"}, "rank must be a positive integer"), ({"tied": "yes"}, "tied must be true or false"),
    ({"rank": D + 1}, f"rank {D + 1} is over the bound n_embd {D}"),
])
def test_bad_configs_are_refused_before_building(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        LowRankHead(LowRankConfig(**changes), vocab_size=V, n_embd=D)  # type: ignore[arg-type]


def test_load_head_refuses_an_absurd_rank_before_building_anything(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "bomb"
    folder.mkdir()
    config = {"head_type": "lowrank", "config": {"rank": 10**12, "tied": False}, "vocab_size": 50_000,
              "n_embd": 768, "prompt_template": "{problem}"}
    (folder / storage.CONFIG_NAME).write_text(json.dumps(config))
    save_file({"alpha": torch.ones(())}, str(folder / storage.WEIGHTS_NAME))

    def never(*_: object) -> None:
        raise AssertionError("a module was built for a config that should have been refused")

    monkeypatch.setattr(storage, "build_head", never)
    with pytest.raises(HeadFormatError, match="rank 1000000000000 is over the bound n_embd 768"):
        load_head(folder)


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path, tied: bool) -> None:
    head = trained_like(tied)
    save_head(head, tmp_path / "h", BASE_INFO, task="math")
    assert json.loads((tmp_path / "h" / storage.CONFIG_NAME).read_text())["config"] == {"rank": 6, "tied": tied}
    loaded, meta = load_head(tmp_path / "h", fingerprint=BASE_INFO["base_fingerprint"], vocab_size=V, n_embd=D)
    assert isinstance(loaded, LowRankHead) and meta.head_type == "lowrank" and not loaded.training
    assert loaded.config == head.config and get_head_type("lowrank").module_cls is LowRankHead
    hidden, emb = make_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(hidden, emb), head(hidden, emb))
    head.prepare(emb)
    loaded.prepare(emb)
    assert torch.equal(loaded.decode(hidden[:, -1]), head.decode(hidden[:, -1]))


def test_a_file_with_the_other_form_s_shapes_is_refused(tmp_path: Path) -> None:
    """The config says tied, the tensors are untied: the loader names the tensor and both shapes."""
    save_head(trained_like(tied=False), tmp_path / "h", BASE_INFO)
    path = tmp_path / "h" / storage.CONFIG_NAME
    raw = json.loads(path.read_text())
    raw["config"]["tied"] = True
    path.write_text(json.dumps(raw))
    with pytest.raises(HeadFormatError, match=r"'up.weight' has shape \(97, 6\), expected \(24, 6\)"):
        load_head(tmp_path / "h")
