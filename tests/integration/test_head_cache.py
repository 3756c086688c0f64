"""The head cache serves a backward-attention head factored first and materialises it once it is reused."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

import server.head_cache as head_cache_module
from heads import BackwardAttentionHead, LinearHead
from heads.base import EMBEDDED_BASE, REPO_ROOT, Base, load_base
from heads.factored import FactoredHead
from server.head_cache import HeadCache
from server.metrics import Metrics
from server.registry import Registry


@pytest.fixture(scope="module")
def base() -> Base:
    return load_base(str(EMBEDDED_BASE))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    for name in ("math", "math-linear"):
        shutil.copytree(REPO_ROOT / "registry" / name, tmp_path / name)
    return Registry(tmp_path)


def wait_for(cache: HeadCache, name: str, kind: type, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not isinstance(cache.get(name).module, kind):
        assert time.monotonic() < deadline, f"{name} never became {kind.__name__}"
        time.sleep(0.01)


def test_first_use_is_factored_and_the_second_materialises_in_the_background(base: Base,
                                                                              registry: Registry) -> None:
    cache = HeadCache(registry, base, Metrics(), capacity=4, materialize_after=2)
    first = cache.get("math")
    assert isinstance(first.module, FactoredHead)
    cache.get("math")  # the second use schedules the keys
    wait_for(cache, "math", BackwardAttentionHead)
    prepared = cache.get("math").module
    assert prepared._key_cache is not None  # type: ignore[union-attr]
    assert first.module.head is prepared  # the factored form keeps serving whoever still holds it
    assert isinstance(cache.get("math-linear").module, LinearHead)  # other kinds load as before


@pytest.mark.parametrize(("after", "kind"), [(1, BackwardAttentionHead), (0, FactoredHead)])
def test_materialize_at_load_or_never(base: Base, registry: Registry, after: int, kind: type) -> None:
    cache = HeadCache(registry, base, Metrics(), capacity=4, materialize_after=after)
    for _ in range(4):
        assert isinstance(cache.get("math").module, kind)
    time.sleep(0.05)
    assert isinstance(cache.get("math").module, kind)


def test_a_head_replaced_while_factored_is_reloaded_not_materialised_stale(base: Base,
                                                                          registry: Registry) -> None:
    cache = HeadCache(registry, base, Metrics(), capacity=4, materialize_after=3)
    old = cache.get("math")
    shutil.rmtree(registry.path("math"))
    shutil.copytree(REPO_ROOT / "registry" / "math-linear", registry.path("math"))
    assert isinstance(cache.get("math").module, LinearHead)
    assert isinstance(old.module, FactoredHead)


def test_a_head_evicted_and_loaded_again_is_probed_once_per_version(base: Base, registry: Registry,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe costs V x D row products on every cold load; the same files passed it once already."""
    cache = HeadCache(registry, base, Metrics(), capacity=1, materialize_after=0)
    probed: list[int] = []
    check = cache.probe.check
    monkeypatch.setattr(cache.probe, "check", lambda head: (probed.append(1), check(head))[1])
    for _ in range(3):  # capacity 1: each get evicts the other head
        cache.get("math")
        cache.get("math-linear")
    assert len(probed) == 2
    config = registry.root / "math" / "head_config.json"
    config.write_text(config.read_text())  # a new version of the files (new inode and mtime)
    cache.get("math")
    assert len(probed) == 3


def test_loads_compute_on_one_torch_thread_and_leave_the_engines_alone(base: Base, registry: Registry,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A second OpenMP team of every core, spinning after each load, would take the cores from the engine."""
    seen: list[int] = []
    real = head_cache_module.load_head

    def watched(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(head_cache_module, "load_head", watched)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as on CI's 2 cores, even where the tests run with OMP_NUM_THREADS=1
    try:
        cache = HeadCache(registry, base, Metrics(), capacity=4, materialize_after=2)
        cache.get("math-linear")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
