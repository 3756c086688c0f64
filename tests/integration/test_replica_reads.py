"""A server reading a head while another process replaces it never pairs one version's config with the other's
weights: the registry and the head cache read between two equal stamps of the files, and read again if not.

Another replica's replace is played here by `heads.folders` itself at the worst moment: between the
registry's stamp and its check, and between the loader's read of the config and of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import heads.storage
from heads import BackwardAttentionConfig, BackwardAttentionHead, HeadMetadata, read_metadata, save_head
from heads.base import EMBEDDED_BASE, SHIPPED_HEADS, Base, load_base
from heads.folders import staged, swap_in
from server.head_cache import HeadCache
from server.metrics import Metrics
from server.registry import Registry


@pytest.fixture(scope="module")
def base() -> Base:
    return load_base(str(EMBEDDED_BASE))


def make_version(out: Path, k: int, latent_dim: int) -> Path:
    meta: HeadMetadata = read_metadata(SHIPPED_HEADS / "math")
    info = {"base_model_name_or_path": meta.base_model_name_or_path, "base_fingerprint": meta.base_fingerprint}
    torch.manual_seed(k)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=latent_dim, residual=False),
                                 vocab_size=meta.vocab_size, n_embd=meta.n_embd)
    save_head(head, out, info, task=f"version-{k}")
    return out


def replace_with(source: Path, dst: Path) -> None:
    """What another replica's `replace=true` upload does to the folder."""
    with staged(dst, "upload") as tmp:
        for file in source.iterdir():
            (tmp / file.name).write_bytes(file.read_bytes())
        swap_in(tmp, dst)


def once(action: Callable[[], None]) -> Callable[[], None]:
    done: list[bool] = []

    def run() -> None:
        if not done:
            done.append(True)
            action()
    return run


def test_a_listing_read_across_a_replace_is_of_one_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(tmp_path / "heads")
    make_version(tmp_path / "heads" / "h", 0, latent_dim=8)
    other = make_version(tmp_path / "v1", 1, latent_dim=16)  # other shapes: a mix would be "invalid"
    replace = once(lambda: replace_with(other, tmp_path / "heads" / "h"))
    real_check = registry._check

    def replaced_first(*args: Any) -> Any:
        replace()  # after the registry took the files' stamp, before it reads them
        return real_check(*args)

    monkeypatch.setattr(registry, "_check", replaced_first)
    entry = registry.inspect("h")
    assert entry.error is None and entry.meta is not None and entry.meta.task == "version-1"
    assert registry.inspect("h") is entry  # remembered under the stamp of the files it describes


def test_a_load_read_across_a_replace_serves_one_version(tmp_path: Path, base: Base,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(tmp_path / "heads")
    make_version(tmp_path / "heads" / "h", 0, latent_dim=8)
    other = make_version(tmp_path / "v1", 1, latent_dim=8)  # same shapes: a mix would load without complaint
    cache = HeadCache(registry, base, Metrics(), capacity=2, materialize_after=1)
    replace = once(lambda: replace_with(other, tmp_path / "heads" / "h"))
    real_read = heads.storage.read_bounded

    def replaced_after_the_config(path: Path, limit: int) -> bytes:
        data = real_read(path, limit)
        if path.name == heads.storage.CONFIG_NAME:
            replace()  # the weights read next are the other version's
        return data

    monkeypatch.setattr(heads.storage, "read_bounded", replaced_after_the_config)
    loaded = cache.get("h")
    assert loaded.meta.task == "version-1" and loaded.stamp == registry.inspect("h").stamp
    torch.manual_seed(1)  # version 1's weights, as make_version drew them
    expected = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, residual=False),
                                     vocab_size=base.vocab_size, n_embd=base.n_embd)
    module: Any = loaded.module
    assert all(torch.equal(module.state_dict()[k], v) for k, v in expected.state_dict().items())
