"""Atomic head folders: written beside their place, swapped in with one rename, under a lock across processes.

A registry folder (the server's HEADS_DIR, or any folder `save_head` writes into) must never show a
name half-written or missing while it is replaced, also across `kill -9`. Every write goes through
these steps, each one a separate call so that a crash can be injected between any two:

1. `staged(dst, kind)` creates the hidden folder `.NAME.<kind>-<id>` beside `dst` (kind: `tmp` for
   `save_head`, `upload` for the server) and holds an flock on it, both under the registry lock, so
   a live writer's folder is never taken for a crash's leftover.
2. The caller writes and fsyncs the files into it (`sync_dir` for the folder itself).
3. `swap_in(tmp, dst)`, under the registry lock: `renameat2(RENAME_EXCHANGE)` when `dst` exists (the
   name now holds the new folder and `tmp` the old one), `renameat2(RENAME_NOREPLACE)` when it does
   not; then the registry folder is fsynced.
4. Leaving `staged` removes `tmp`: the old version after a swap, the unfinished one after a failure.

`retire(dst)` deletes the same way: one rename to `.NAME.deleted-<id>` under the lock, then removal.
`recover(root)` (the server's start-up) removes every leftover of those steps whose flock no live
process holds, so a crash at any point leaves the name on its old or its new complete version and,
after a restart, no hidden folder behind.

Where the kernel or filesystem cannot exchange (renameat2 missing, EINVAL, ENOSYS, EOPNOTSUPP), the
fallback renames `dst` away to `.NAME.old-<id>` and `tmp` into place: for the moment between the two
renames the name is absent to readers (writers are still serialised by the lock), and a crash there
leaves `.NAME.old-*`, which `recover` renames back. Linux on ext4, xfs, btrfs and tmpfs exchanges.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
LEFTOVER_KINDS = ("tmp", "upload", "old", "deleted")
LEFTOVER_RE = re.compile(r"\.(?P<name>[^/]+)\.(?P<kind>tmp|upload|old|deleted)-[0-9a-f]+")
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (or not Linux): the fallback below
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


class RenameUnsupported(Exception):
    """This kernel or filesystem has no renameat2 with the flag asked for."""


def rename2(src: Path, dst: Path, flags: int) -> None:
    """renameat2(2); RenameUnsupported where the flag cannot work here, OSError for anything else."""
    if _renameat2 is None:
        raise RenameUnsupported("renameat2 is not available")
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            raise RenameUnsupported(os.strerror(err))
        raise OSError(err, os.strerror(err), str(src), None, str(dst))


def sync_dir(path: Path) -> None:
    """fsync a folder, so the renames and files in it survive a power cut, not only a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """One file replaced in one rename: a reader sees the old bytes or the new ones, never half (reports,
    memos). Written to a hidden sibling of a unique name, fsynced, renamed over `path`; a failure removes it."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def registry_lock(root: Path) -> Iterator[None]:
    """Exclusive flock on the registry folder itself: serialises writers across threads and processes.

    Each call opens its own descriptor, and flock treats separate opens as separate owners, so two
    threads of one process exclude each other as two processes do. No lock file is left behind.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def staged(dst: Path, kind: str) -> Iterator[Path]:
    """Steps 1 and 4: a hidden, locked folder beside `dst` for the caller to fill; removed on the way out."""
    if kind not in LEFTOVER_KINDS:
        raise ValueError(f"kind must be one of {LEFTOVER_KINDS}, got {kind!r}")
    root = dst.parent
    root.mkdir(parents=True, exist_ok=True)
    with registry_lock(root):
        tmp = root / f".{dst.name}.{kind}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until we are done: `recover` leaves this folder alone
    try:
        yield tmp
    finally:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: Path, dst: Path, *, replace: bool = True) -> bool:
    """Step 3: make `tmp` the folder at `dst` in one rename. True if it replaced one.

    FileExistsError if `dst` exists and `replace` is false (checked under the lock, so two writers
    of one name get one success and one refusal, never two successes).
    """
    with registry_lock(dst.parent):
        if not os.path.lexists(dst):
            try:
                try:
                    rename2(tmp, dst, RENAME_NOREPLACE)
                except RenameUnsupported:
                    os.rename(tmp, dst)  # the lock keeps other writers out
                sync_dir(dst.parent)
                return False
            except FileExistsError:
                pass  # copied in by hand meanwhile (hand copies take no lock): an existing folder
        if not replace:
            raise FileExistsError(errno.EEXIST, "already exists", str(dst))
        try:
            rename2(tmp, dst, RENAME_EXCHANGE)
        except RenameUnsupported:
            _swap_by_two_renames(tmp, dst)
        sync_dir(dst.parent)
    return True


def _swap_by_two_renames(tmp: Path, dst: Path) -> None:
    """The fallback: the name is absent between these renames; `recover` undoes a crash between them."""
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(dst, old)
    os.rename(tmp, dst)
    os.rename(old, tmp)  # `staged` removes tmp, as after an exchange


def retire(dst: Path) -> None:
    """Delete a folder: one atomic rename out of sight under the lock, then removal. FileNotFoundError if absent."""
    trash = dst.parent / f".{dst.name}.deleted-{uuid.uuid4().hex[:12]}"
    with registry_lock(dst.parent):
        if not dst.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such folder", str(dst))
        os.rename(dst, trash)
        sync_dir(dst.parent)
    shutil.rmtree(trash, ignore_errors=True)


def recover(root: Path) -> list[str]:
    """Remove what crashed writes left in `root`, or rename a lost `.NAME.old-*` back; what was done, in words.

    Runs under the registry lock and skips every folder whose flock a live process holds, so a
    second server (or a training run) writing into the same folder right now is not disturbed.
    """
    done: list[str] = []
    if not root.is_dir():
        return done
    with registry_lock(root):
        leftovers = [(p, m) for p in root.iterdir() if (m := LEFTOVER_RE.fullmatch(p.name)) and p.is_dir()]
        # A lost name comes back from its newest `.old` copy; every other leftover is removed.
        leftovers.sort(key=lambda item: _mtime(item[0]), reverse=True)
        for path, match in leftovers:
            if _in_use(path):
                continue
            target = root / match["name"]
            if match["kind"] == "old" and not os.path.lexists(target):
                os.rename(path, target)
                done.append(f"restored {target.name!r} from {path.name}")
            else:
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path.name}")
        if done:
            sync_dir(root)
    return done


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # removed by its writer meanwhile
        return 0


def _in_use(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return True  # gone or unreadable meanwhile: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
