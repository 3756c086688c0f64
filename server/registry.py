"""The head registry on disk: one folder per head under HEADS_DIR, the only source of truth.

Nothing is cached here: every call lists or reads the folder, so heads copied in by hand (or
written by `training/`) appear without a restart. Uploads are validated in memory before a byte
touches the registry, then written to a hidden temporary folder and renamed into place, so a
rejected or interrupted upload leaves the registry exactly as it was.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from heads import CONFIG_NAME, WEIGHTS_NAME, HeadError, HeadMetadata, load_head_bytes, read_metadata
from heads.storage import replace_dir
from server.errors import HeadExistsError, HeadNotFoundError, HeadUnavailableError, InvalidHeadNameError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    """Refuse anything but a plain lowercase name: no separators, no leading dot, so no traversal."""
    if not NAME_RE.fullmatch(name):
        raise InvalidHeadNameError(f"invalid head name {name!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
                                   "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class HeadStamp:
    """What identifies one version of a head's files: a replaced or edited head gets a new stamp."""

    config: tuple[int, int, int]  # (inode, mtime_ns, size)
    weights: tuple[int, int, int]


def _stamp_of(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()  # check-then-rename must not interleave between uploads

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        """Sorted names of the folders that look like heads; hidden (temporary) folders are skipped."""
        found = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not NAME_RE.fullmatch(entry.name) or not entry.is_dir():
                continue
            if (entry / CONFIG_NAME).is_file():
                found.append(entry.name)
        return sorted(found)

    def metadata(self, name: str) -> HeadMetadata:
        """The head's checked config; 404 if absent, 409 if the folder is there but unreadable."""
        folder = self.path(name)
        if not (folder / CONFIG_NAME).is_file():
            raise HeadNotFoundError(f"no head named {name!r}")
        try:
            return read_metadata(folder)
        except FileNotFoundError:  # deleted or replaced while we looked
            raise HeadNotFoundError(f"no head named {name!r}") from None
        except HeadError as e:
            reason = public_message(e, self.root)
            raise HeadUnavailableError(f"head {name!r} in the registry is unusable: {reason}") from None

    def stamp(self, name: str) -> HeadStamp:
        folder = self.path(name)
        try:
            return HeadStamp(_stamp_of(folder / CONFIG_NAME), _stamp_of(folder / WEIGHTS_NAME))
        except FileNotFoundError:
            if (folder / CONFIG_NAME).is_file():
                raise HeadUnavailableError(f"head {name!r} in the registry has no {WEIGHTS_NAME}") from None
            raise HeadNotFoundError(f"no head named {name!r}") from None

    def size_bytes(self, name: str) -> int:
        folder = self.path(name)
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())

    def register(self, name: str, config_bytes: bytes, weights_bytes: bytes, *, fingerprint: str, vocab_size: int,
                 n_embd: int, replace: bool) -> HeadMetadata:
        """Validate the files against the base, then write them atomically under `name`.

        Raises HeadExistsError (name taken), and the heads library's HeadFormatError or
        BaseMismatchError (bad files, other base) before anything is written.
        """
        target = self.path(name)
        if target.exists() and not replace:
            raise HeadExistsError(f"a head named {name!r} already exists; pass replace=true to overwrite it")
        _, meta = load_head_bytes(config_bytes, weights_bytes, fingerprint=fingerprint, vocab_size=vocab_size,
                                  n_embd=n_embd)
        tmp = self.root / f".{name}.upload-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_synced(tmp / WEIGHTS_NAME, weights_bytes)
            _write_synced(tmp / CONFIG_NAME, config_bytes)
            with self._write_lock:
                if target.exists() and not replace:
                    raise HeadExistsError(f"a head named {name!r} already exists; pass replace=true to overwrite it")
                replace_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("registered head %r (%s, %d weight bytes)", name, meta.head_type, len(weights_bytes))
        return meta

    def delete(self, name: str) -> None:
        """Remove the folder; it is renamed to a hidden name first so listings never see half of it."""
        target = self.path(name)
        with self._write_lock:
            if not target.is_dir():
                raise HeadNotFoundError(f"no head named {name!r}")
            trash = self.root / f".{name}.deleted-{uuid.uuid4().hex[:8]}"
            target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("deleted head %r", name)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def public_message(error: Exception, root: Path) -> str:
    """The error message without the server's absolute registry path (clients know heads by name)."""
    return str(error).replace(str(root) + os.sep, "")
