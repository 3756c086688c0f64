"""An LRU of heads loaded from the registry and prepared on the device.

Loading a head means reading and validating its safetensors, moving it to the device and calling
`prepare` (which folds it against the base's embeddings), so it is worth keeping the recently
used ones. The registry stays the source of truth: every lookup compares the files' stamp (inode,
mtime, size) with the cached one and reloads a head that was replaced on disk. Eviction only
drops the cache's reference; a sequence that is generating holds its own, so it finishes normally.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from torch import nn

from heads import HeadError, HeadMetadata, load_head
from heads.base import Base
from server.errors import HeadNotFoundError, HeadUnavailableError
from server.factored import FactoredHead, SharedNorms, factorable
from server.metrics import Metrics
from server.registry import HeadStamp, Registry, public_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedHead:
    name: str
    module: nn.Module | FactoredHead  # ready to decode on the base's device, eval mode
    meta: HeadMetadata
    stamp: HeadStamp


class HeadCache:
    def __init__(self, registry: Registry, base: Base, metrics: Metrics, capacity: int,
                 materialize_after: int = 2) -> None:
        """`materialize_after`: a backward-attention head serves its first uses in factored form
        (server/factored.py: milliseconds to load, kilobytes resident) and has its keys materialised
        in the background on this use (1: at load, synchronously; 0: never)."""
        self.registry, self.base, self.metrics, self.capacity = registry, base, metrics, capacity
        self.materialize_after = materialize_after
        self._heads: OrderedDict[str, LoadedHead] = OrderedDict()
        self._uses: dict[str, int] = {}
        self._norms: SharedNorms | None = None  # per-base quantities of factored heads, made on first need
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headserve-materialize")
        self._lock = threading.Lock()  # guards _heads: handlers load and ask what is resident
        self._load_lock = threading.Lock()  # one load at a time

    def get(self, name: str) -> LoadedHead:
        """The prepared head, loading it (and evicting the least recently used) when needed.

        Loads run one at a time: preparing a head is a large matmul that already uses every core, so
        requests that need the same head wait for one load instead of each doing it, and loads of
        different heads do not thrash each other (or the engine) by running side by side.
        """
        cached = self._lookup(name)
        if cached is not None:
            self._count_use(cached)
            return cached
        with self._load_lock:
            cached = self._lookup(name)  # another request may have loaded it while we waited
            if cached is not None:
                return cached
            loaded = self._load(name, self.registry.stamp(name))
        with self._lock:
            self._uses[name] = 1
            self._heads[name] = loaded
            self._heads.move_to_end(name)
            while len(self._heads) > self.capacity:
                evicted, _ = self._heads.popitem(last=False)
                self._uses.pop(evicted, None)
                log.info("evicted head %r from the cache", evicted)
            self.metrics.heads_resident.set(len(self._heads))
        return loaded

    def _lookup(self, name: str) -> LoadedHead | None:
        """The cached head if its files have not changed on disk since it was loaded."""
        stamp = self.registry.stamp(name)
        with self._lock:
            cached = self._heads.get(name)
            if cached is not None and cached.stamp == stamp:
                self._heads.move_to_end(name)
                return cached
        return None

    def _load(self, name: str, stamp: HeadStamp) -> LoadedHead:
        start = time.perf_counter()
        try:
            module, meta = load_head(self.registry.path(name), fingerprint=self.base.fingerprint,
                                     vocab_size=self.base.vocab_size, n_embd=self.base.n_embd)
        except FileNotFoundError:
            raise HeadNotFoundError(f"no head named {name!r}") from None
        except HeadError as e:  # a hand-copied head that is broken or trained on another base
            reason = public_message(e, self.registry.root)
            raise HeadUnavailableError(f"head {name!r} cannot be served: {reason}") from None
        module.to(self.base.device)  # heads keep their float32 weights; decode casts hidden states to them
        ready: nn.Module | FactoredHead = module
        if factorable(module) and self.materialize_after != 1:
            if self._norms is None:
                self._norms = SharedNorms(self.base.embeddings)
            ready = FactoredHead(module, self._norms)  # type: ignore[arg-type]
        else:
            module.prepare(self.base.embeddings)  # type: ignore[operator]
        seconds = time.perf_counter() - start
        self.metrics.head_load_seconds.observe(seconds)
        self.metrics.head_loads_total.labels(head=name).inc()
        log.info("loaded head %r (%s) in %.3fs", name, meta.head_type, seconds)
        return LoadedHead(name=name, module=ready, meta=meta, stamp=stamp)

    def _count_use(self, cached: LoadedHead) -> None:
        """Schedule materialising a factored head's keys once it proves popular."""
        if not isinstance(cached.module, FactoredHead) or self.materialize_after < 2:
            return
        with self._lock:
            uses = self._uses[cached.name] = self._uses.get(cached.name, 0) + 1
        if uses == self.materialize_after:
            self._background.submit(self._materialize, cached)

    def _materialize(self, factored: LoadedHead) -> None:
        """Prepare the full head off every request's path, then swap it in if nothing changed meanwhile.
        Requests already holding the factored form finish with it: both give the same logits."""
        try:
            with self._load_lock:
                start = time.perf_counter()
                module = factored.module.head  # type: ignore[union-attr]
                module.prepare(self.base.embeddings)
                ready = LoadedHead(name=factored.name, module=module, meta=factored.meta, stamp=factored.stamp)
                with self._lock:
                    if self._heads.get(factored.name) is factored:
                        self._heads[factored.name] = ready
                log.info("materialised head %r in %.3fs", factored.name, time.perf_counter() - start)
        except Exception:  # the factored form keeps serving; nothing a client could act on
            log.exception("materialising head %r failed", factored.name)

    def discard(self, name: str) -> None:
        """Forget a deleted head; requests still using it keep their own reference."""
        with self._lock:
            self._heads.pop(name, None)
            self._uses.pop(name, None)
            self.metrics.heads_resident.set(len(self._heads))

    def resident(self) -> set[str]:
        with self._lock:
            return set(self._heads)
