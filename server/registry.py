"""The head registry on disk: one folder per head under HEADS_DIR, the only source of truth.

Every call looks at the folder, so heads copied in by hand (or written by `training/`) appear
without a restart. What the registry learns about one version of a head's files (its checked
metadata, or why it cannot be served) is remembered under the files' stamp: listing parses only
what changed, a bad folder is logged once rather than on every listing, and a head that failed to
load stays refused until its files change. Writes follow `heads.folders`: the caller validates the
files first, they are written into a hidden staged folder and swapped in with one rename under a
lock every process writing to the folder shares; start-up removes what a crash left behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from heads import CONFIG_NAME, WEIGHTS_NAME, BaseMismatchError, HeadError, HeadMetadata
from heads.folders import recover, retire, staged, swap_in
from heads.storage import MAX_CONFIG_BYTES, check_base, check_weights_size, parse_metadata, read_bounded, write_files
from server.errors import HeadExistsError, HeadNotFoundError, HeadUnavailableError, InvalidHeadNameError
from server.schemas import BASE_LABEL, HEAD_NAME_PATTERN

log = logging.getLogger(__name__)

NAME_RE = re.compile(HEAD_NAME_PATTERN)  # the one rule for head names (server.schemas)


def check_name(name: str) -> str:
    """Refuse anything but a plain lowercase name: no separators, no leading dot, so no traversal."""
    if not NAME_RE.fullmatch(name):
        raise InvalidHeadNameError(f"invalid head name {name!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
                                   "starting with a letter or digit")
    if name == BASE_LABEL:
        raise InvalidHeadNameError(f"invalid head name {name!r}: it names the base's own head in requests")
    return name


@dataclass(frozen=True)
class HeadStamp:
    """What identifies one version of a head's files: a replaced or edited head gets a new stamp."""

    config: tuple[int, int, int]  # (inode, mtime_ns, size)
    weights: tuple[int, int, int] | None  # None: head.safetensors is missing


@dataclass(frozen=True)
class HeadEntry:
    """What the registry knows about one version of a head folder."""

    name: str
    stamp: HeadStamp  # the version of the files this entry describes
    meta: HeadMetadata | None  # None when head_config.json itself is unusable
    error: str | None  # why it cannot be served (files, base, or a failed load); None: ready
    bytes: int  # the folder's files on disk
    # Made for another base (its recorded fingerprint differs from the served one): a normal state of a
    # registry shared by servers of different bases, listed "incompatible", never logged as a fault.
    incompatible: bool = False

    @property
    def status(self) -> Literal["ready", "invalid", "incompatible"]:
        if self.error is None:
            return "ready"
        return "incompatible" if self.incompatible else "invalid"


def _stamp_of(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _folder_bytes(folder: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file(follow_symlinks=False))


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the dicts below
        self._entries: dict[str, HeadEntry] = {}  # the latest verdict per name, keyed by its stamp
        self._noticed: set[str] = set()  # folders that are not heads, logged once
        self._base: tuple[str, int, int] | None = None  # fingerprint, vocab_size, n_embd of the base served
        for done in recover(self.root):
            log.warning("registry start-up: %s (left by an interrupted write)", done)

    def bind_base(self, fingerprint: str, vocab_size: int, n_embd: int) -> None:
        """From now on heads made for another base are listed invalid (the base is known once loaded)."""
        with self._lock:
            self._base = (fingerprint, vocab_size, n_embd)
            self._entries.clear()

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        """Sorted names of the folders that hold a head_config.json; hidden (temporary) folders are skipped,
        other folders are logged once."""
        found = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if not NAME_RE.fullmatch(entry.name):
                self._notice(entry.name, "its name is not a valid head name (a-z, 0-9, '.', '_', '-')")
            elif entry.name == BASE_LABEL:
                self._notice(entry.name, f"{BASE_LABEL!r} names the base's own head in requests")
            elif not os.path.isfile(os.path.join(entry.path, CONFIG_NAME)):
                self._notice(entry.name, f"it holds no {CONFIG_NAME}")
            else:
                found.append(entry.name)
        return sorted(found)

    def _notice(self, folder: str, why: str) -> None:
        with self._lock:
            if folder in self._noticed:
                return
            self._noticed.add(folder)
        log.warning("registry folder %r is not listed as a head: %s", folder, why)

    def inspect(self, name: str) -> HeadEntry:
        """The head's entry, checked once per version of its files; HeadNotFoundError if there is none,
        HeadUnavailableError (409) in the unlikely case that it was replaced during every one of several reads."""
        folder = self.path(name)
        changing = False
        for _ in range(10):  # a replace or delete between two reads (by any process sharing the folder): look again
            try:
                stamp = self._stamp(folder)
                with self._lock:
                    cached = self._entries.get(name)
                if cached is not None and cached.stamp == stamp:
                    return cached
                entry = self._check(name, folder, stamp)
                # Read between two equal stamps, or the config, sizes and weights' stamp may be of two versions.
                changing = self._stamp(folder) != stamp
                if changing:
                    continue
            except FileNotFoundError:
                changing = False
                continue
            with self._lock:
                cached = self._entries.get(name)
                if cached is not None and cached.stamp == stamp:
                    return cached  # another request checked the same version meanwhile
                self._entries[name] = entry
            if entry.incompatible:
                log.info("head %r is listed as incompatible: %s", name, entry.error)
            elif entry.error is not None:
                log.warning("head %r is listed as invalid: %s", name, entry.error)
            return entry
        if changing:
            raise HeadUnavailableError(f"head {name!r} is being replaced too often to read; try again")
        with self._lock:
            self._entries.pop(name, None)
        raise HeadNotFoundError(f"no head named {name!r}")

    def stamp(self, name: str) -> HeadStamp:
        """The stamp of the head's files as they are now; FileNotFoundError if it has none."""
        return self._stamp(self.path(name))

    def _stamp(self, folder: Path) -> HeadStamp:
        config = _stamp_of(folder / CONFIG_NAME)  # FileNotFoundError: no head here
        try:
            weights: tuple[int, int, int] | None = _stamp_of(folder / WEIGHTS_NAME)
        except FileNotFoundError:
            weights = None
        return HeadStamp(config, weights)

    def _check(self, name: str, folder: Path, stamp: HeadStamp) -> HeadEntry:
        """Everything that can be known without reading the weights: config, sizes, and the base."""
        size = _folder_bytes(folder)
        try:
            meta = parse_metadata(read_bounded(folder / CONFIG_NAME, MAX_CONFIG_BYTES))
        except HeadError as e:
            return HeadEntry(name, stamp, None, public_message(e, self.root), size)
        except (PermissionError, IsADirectoryError) as e:
            return HeadEntry(name, stamp, None, f"{CONFIG_NAME} cannot be read ({e.strerror})", size)
        error, incompatible = None, False
        try:
            if stamp.weights is None:
                error = f"{WEIGHTS_NAME} is missing"
            else:
                check_weights_size(meta, stamp.weights[2])
                if self._base is not None:
                    fingerprint, vocab_size, n_embd = self._base
                    incompatible = meta.base_fingerprint != fingerprint
                    check_base(meta, fingerprint=fingerprint, vocab_size=vocab_size, n_embd=n_embd)
        except BaseMismatchError as e:
            error = public_message(e, self.root)
        except HeadError as e:
            error, incompatible = public_message(e, self.root), False
        return HeadEntry(name, stamp, meta, error, size, incompatible=incompatible and error is not None)

    def reject(self, entry: HeadEntry, reason: str) -> None:
        """Remember that this version of the head failed to load (or to compute sane logits): it is listed
        invalid and refused without another load until its files change."""
        with self._lock:
            if self._entries.get(entry.name) is not entry:  # the files changed meanwhile: the new ones get a try
                return
            self._entries[entry.name] = dataclasses.replace(entry, error=reason)
        log.warning("head %r is listed as invalid: %s", entry.name, reason)

    @property
    def served_fingerprint(self) -> str | None:
        """The fingerprint of the base this registry serves for (None before the base is bound)."""
        with self._lock:
            return self._base[0] if self._base is not None else None

    def metadata(self, name: str) -> HeadMetadata:
        """The head's checked config; 404 if absent, 409 if the folder is there but cannot be served."""
        entry = self.inspect(name)
        if entry.error is not None or entry.meta is None:
            raise HeadUnavailableError(f"head {name!r} cannot be served: {entry.error}")
        return entry.meta

    def check_free(self, name: str, replace: bool) -> None:
        """409 early for a taken name (`register` checks again under the lock)."""
        if not replace and os.path.lexists(self.path(name)):
            raise _taken(name)

    def register(self, name: str, config_bytes: bytes, weights_bytes: bytes, meta: HeadMetadata, *,
                 replace: bool) -> HeadEntry:
        """Write files the caller has validated (HeadCache.check_upload) under `name`, atomically.

        Writers of one name are serialised by the registry lock, so each gets its write or a
        HeadExistsError (replace=false on a taken name), and readers see the old or the new head.
        """
        target = self.path(name)
        with staged(target, "upload") as tmp:
            write_files(tmp, config_bytes, weights_bytes)
            stamp = self._stamp(tmp)  # renaming keeps inodes, times and sizes: the stamp the files have once in place
            try:
                swap_in(tmp, target, replace=replace)
            except FileExistsError:
                raise _taken(name) from None
        log.info("registered head %r (%s, %d weight bytes)", name, meta.head_type, len(weights_bytes))
        return HeadEntry(name, stamp, meta, None, len(config_bytes) + len(weights_bytes))

    def delete(self, name: str) -> None:
        """Remove the folder: renamed out of sight in one step (under the writers' lock), then removed."""
        try:
            retire(self.path(name))
        except FileNotFoundError:
            raise HeadNotFoundError(f"no head named {name!r}") from None
        with self._lock:
            self._entries.pop(name, None)
        log.info("deleted head %r", name)


def _taken(name: str) -> HeadExistsError:
    return HeadExistsError(f"a head named {name!r} already exists; pass replace=true to overwrite it")


def public_message(error: Exception, root: Path) -> str:
    """The error message without the server's absolute registry path (clients know heads by name)."""
    return str(error).replace(str(root) + os.sep, "")
