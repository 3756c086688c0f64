"""An LRU of heads loaded from the registry, checked on the base's probe states and prepared on the device.

Loading a head means reading and validating its safetensors, moving it to the device, building its
serving form and running it on the base's probe states (server/head_checks.py), so it is worth
keeping the recently used ones. The registry stays the source of truth: every lookup compares the
files' stamp (inode, mtime, size) with the cached one and reloads a head that was replaced on disk.
Eviction only drops the cache's reference; a sequence that is generating holds its own, so it
finishes normally.

Loads run on the cache's own one-thread executor, never on the server's shared thread pool, so a
slow or huge head cannot starve other requests (or /healthz). Requests for a head that is loading
wait on that one load (single-flight), and a load that fails is remembered by the registry under
the files' stamp: a broken head costs one load, not one per request, until its files change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from heads import HeadError, HeadMetadata, HeadModule, load_head, load_head_bytes
from heads.base import Base
from heads.factored import FactoredHead, ServingHead, SharedNorms, factorable
from server.errors import HeadUnavailableError
from server.head_checks import HeadProbe
from server.metrics import Metrics
from server.registry import HeadEntry, HeadStamp, Registry, public_message
from server.torch_threads import pin_one_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedHead:
    name: str
    module: ServingHead  # ready to decode on the base's device, eval mode
    meta: HeadMetadata
    stamp: HeadStamp


class HeadCache:
    def __init__(self, registry: Registry, base: Base, metrics: Metrics, capacity: int,
                 materialize_after: int = 2) -> None:
        """`materialize_after`: a backward-attention head serves its first uses in factored form
        (heads/factored.py: milliseconds to load, kilobytes resident) and has its keys materialised
        in the background on this use (1: at load, synchronously; 0: never)."""
        self.registry, self.base, self.metrics, self.capacity = registry, base, metrics, capacity
        self.materialize_after = materialize_after
        self.probe = HeadProbe(base)
        registry.bind_base(base.fingerprint, base.vocab_size, base.n_embd)
        self._heads: OrderedDict[str, LoadedHead] = OrderedDict()
        self._uses: dict[str, int] = {}
        self._inflight: dict[str, tuple[HeadStamp | None, Future[LoadedHead]]] = {}
        # The files (by stamp) whose probe passed: a head evicted and loaded again, or uploaded (checked by
        # `check_upload`) and then loaded, is not probed again.
        self._probed: dict[str, HeadStamp] = {}
        self._norms: SharedNorms | None = None  # per-base quantities of factored heads, made on first need
        # Loads and upload checks, one at a time: loads of different heads would only thrash each other (and
        # the engine). Each of these threads computes with one torch thread (server/torch_threads.py says why):
        # a load is short; the engine's steps are not.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headserve-load",
                                          initializer=pin_one_thread)
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headserve-materialize",
                                              initializer=pin_one_thread)
        self._lock = threading.Lock()  # guards _heads, _uses and _inflight
        self._load_lock = threading.Lock()  # a load and a materialisation never run side by side

    def submit(self, name: str) -> Future[LoadedHead]:
        """The prepared head as a future: done at once when cached, else the one load of it in flight.

        Raises HeadNotFoundError (404) or HeadUnavailableError (409: a broken head, or one whose load
        already failed) right away, without a load. Awaited from the event loop with
        `asyncio.wrap_future`; shield it, so that one caller giving up does not cancel the others' load.
        """
        entry = self.registry.inspect(name)
        if entry.error is not None:
            raise HeadUnavailableError(f"head {name!r} cannot be served: {entry.error}")
        with self._lock:
            cached = self._heads.get(name)
            if cached is None or cached.stamp != entry.stamp:
                flight = self._inflight.get(name)
                if flight is not None and flight[0] == entry.stamp:
                    return flight[1]
                future = self._loader.submit(self._load_and_keep, entry)
                self._inflight[name] = (entry.stamp, future)
                return future
            self._heads.move_to_end(name)
        self._count_use(cached)
        done: Future[LoadedHead] = Future()
        done.set_result(cached)
        return done

    def get(self, name: str) -> LoadedHead:
        """`submit` and wait: for callers on their own thread."""
        return self.submit(name).result()

    def check_upload(self, config_bytes: bytes, weights_bytes: bytes) -> Future[HeadMetadata]:
        """Validate an upload on the loader as a load would (files, base, probe states), writing nothing.

        The future raises HeadFormatError (422, HeadOutputError for unusable logits) or
        BaseMismatchError (409).
        """
        return self._loader.submit(self._check_upload, config_bytes, weights_bytes)

    def _check_upload(self, config_bytes: bytes, weights_bytes: bytes) -> HeadMetadata:
        module, meta = load_head_bytes(config_bytes, weights_bytes, fingerprint=self.base.fingerprint,
                                       vocab_size=self.base.vocab_size, n_embd=self.base.n_embd)
        with self._load_lock:
            self.probe.check(self._serving_form(module))
        return meta

    def _load_and_keep(self, entry: HeadEntry) -> LoadedHead:
        name = entry.name
        try:
            loaded = self._load(entry)
        except BaseException:
            with self._lock:
                if self._inflight.get(name, (None, None))[0] == entry.stamp:
                    del self._inflight[name]
            raise
        with self._lock:
            if self._inflight.get(name, (None, None))[0] == entry.stamp:
                del self._inflight[name]
            self._uses[name] = 1
            self._heads[name] = loaded
            self._heads.move_to_end(name)
            while len(self._heads) > self.capacity:
                evicted, _ = self._heads.popitem(last=False)
                self._uses.pop(evicted, None)
                log.info("evicted head %r from the cache", evicted)
            self.metrics.heads_resident.set(len(self._heads))
        return loaded

    def _load(self, entry: HeadEntry) -> LoadedHead:
        name, start = entry.name, time.perf_counter()
        for _ in range(5):
            try:
                # Stamps right before and after the read: equal, the config and the weights read are one version's
                # (`stamp`, maybe newer than `entry`'s); else the head was replaced meanwhile, here or by another
                # server sharing the folder, and the two files may be of two versions: read again.
                stamp = self.registry.stamp(name)
                module, meta = load_head(self.registry.path(name), fingerprint=self.base.fingerprint,
                                         vocab_size=self.base.vocab_size, n_embd=self.base.n_embd)
                if self.registry.stamp(name) != stamp:
                    continue
                with self._load_lock:
                    ready = self._serving_form(module)
                    if self._probed.get(name) != stamp:
                        self.probe.check(ready)
                        self._probed[name] = stamp
                break
            except (HeadError, FileNotFoundError) as e:  # broken, for another base, or computing nonsense
                current = self.registry.inspect(name)  # HeadNotFoundError (404) if it was deleted meanwhile
                if current.stamp != entry.stamp and current.error is None:
                    entry = current  # replaced while we read it: load the new version instead
                    continue
                reason = current.error or public_message(e, self.registry.root)
                self.registry.reject(entry, reason)
                raise HeadUnavailableError(f"head {name!r} cannot be served: {reason}") from None
            except Exception as e:  # e.g. out of memory: remembered too, so it is not retried by every request
                log.exception("loading head %r failed", name)
                reason = f"loading it failed ({type(e).__name__})"
                self.registry.reject(entry, reason)
                raise HeadUnavailableError(f"head {name!r} cannot be served: {reason}") from None
        else:
            raise HeadUnavailableError(f"head {name!r} cannot be served: it is being replaced too often to load")
        seconds = time.perf_counter() - start
        self.metrics.head_load_seconds.observe(seconds)
        self.metrics.head_loads_total.labels(head=name).inc()
        log.info("loaded head %r (%s) in %.3fs", name, meta.head_type, seconds)
        return LoadedHead(name=name, module=ready, meta=meta, stamp=stamp)

    def _serving_form(self, module: HeadModule) -> ServingHead:
        module.to(self.base.device)  # heads keep their float32 weights; decode casts hidden states to them
        if not module.generative:
            return module  # a classifier: its label logits need nothing prepared (and it cannot decode)
        if factorable(module) and self.materialize_after != 1:
            if self._norms is None:
                self._norms = SharedNorms(self.base.embeddings)
            return FactoredHead(module, self._norms)
        module.prepare(self.base.embeddings)
        return module

    def _count_use(self, cached: LoadedHead) -> None:
        """Schedule materialising a factored head's keys once it proves popular."""
        if not isinstance(cached.module, FactoredHead) or self.materialize_after < 2:
            return
        with self._lock:
            uses = self._uses[cached.name] = self._uses.get(cached.name, 0) + 1
        if uses == self.materialize_after:
            self._background.submit(self._materialize, cached, cached.module)

    def _materialize(self, factored: LoadedHead, form: FactoredHead) -> None:
        """Prepare the full head of `factored` (whose module is `form`) off every request's path, then swap it in
        if nothing changed meanwhile. Requests already holding the factored form finish with it: both give the
        same logits."""
        try:
            with self._load_lock:
                start = time.perf_counter()
                module = form.head
                module.prepare(self.base.embeddings)
                ready = LoadedHead(name=factored.name, module=module, meta=factored.meta, stamp=factored.stamp)
                with self._lock:
                    if self._heads.get(factored.name) is factored:
                        self._heads[factored.name] = ready
                log.info("materialised head %r in %.3fs", factored.name, time.perf_counter() - start)
        except Exception:  # the factored form keeps serving; nothing a client could act on
            log.exception("materialising head %r failed", factored.name)

    def registered(self, entry: HeadEntry) -> None:
        """A head was just uploaded: drop any old copy (never serve it again), and remember that these files
        passed the probe in `check_upload`, so their first load does not run it again."""
        self.discard(entry.name)
        with self._lock:
            self._probed[entry.name] = entry.stamp

    def discard(self, name: str) -> None:
        """Forget a deleted head; requests still using it keep their own reference."""
        with self._lock:
            self._heads.pop(name, None)
            self._uses.pop(name, None)
            self._probed.pop(name, None)
            self.metrics.heads_resident.set(len(self._heads))

    def resident(self) -> set[str]:
        with self._lock:
            return set(self._heads)
