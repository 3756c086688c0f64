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

Several machines sharing one folder (NFS, EFS, CephFS, SMB: a Kubernetes ReadWriteMany volume) need
locks the file server arbitrates, and a directory cannot carry one there: Linux's NFS client has no
flock for directories (the lock stays local to one machine) and emulates flock on files as a
byte-range lock, which needs the file open for writing. On such a mount (any filesystem not in
`LOCAL_FILESYSTEMS`, read from /proc/self/mountinfo) the registry lock is an flock on the regular
file `.headserve.lock` in the folder, left there on purpose (unlinking a lock file races its lockers),
and `staged` holds that lock from step 1 to step 4: writers of one folder take turns for the whole
write, so `recover` never meets a live writer's folder and no per-folder lock is needed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
LEFTOVER_KINDS = ("tmp", "upload", "old", "deleted")
LEFTOVER_RE = re.compile(r"\.(?P<name>[^/]+)\.(?P<kind>tmp|upload|old|deleted)-[0-9a-f]+")
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
# Filesystems only this machine mounts: a lock on the folder itself is enough. Anything else (nfs, nfs4, cifs,
# ceph, fuse.*, or a type not named here) gets the lock file, which works on local filesystems too.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "zfs", "f2fs",
                               "bcachefs", "jfs", "reiserfs", "nilfs2", "apfs", "hfs"})
LOCK_FILE = ".headserve.lock"  # in a folder on a shared mount only; hidden, so never listed as a head


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


_held = threading.local()  # `roots`: the folders whose registry lock this thread holds
_turns: dict[str, threading.Lock] = {}  # per folder: threads of this process take turns before the flock
_turns_guard = threading.Lock()
_writing: set[str] = set()  # this process's staged folders: `recover` skips them even where it holds the lock


@contextmanager
def registry_lock(root: Path) -> Iterator[None]:
    """Exclusive flock serialising the writers of `root` across threads, processes and, on a shared mount, machines.

    On a local filesystem the lock is on the folder itself and no lock file is left behind; on a shared
    mount it is on `LOCK_FILE` (see the module's docstring). Threads of one process also take turns on a
    mutex first, whatever the filesystem's lock semantics; a thread that holds the lock may take it again
    (a write on a shared mount holds it around the steps that take it themselves).
    """
    key = os.path.realpath(root)
    roots: set[str] = _held.__dict__.setdefault("roots", set())
    if key in roots:
        yield
        return
    with _turns_guard:
        turn = _turns.setdefault(key, threading.Lock())
    with turn:
        if shared_mount(key):
            fd = os.open(os.path.join(key, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
        else:
            fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            roots.add(key)
            try:
                yield
            finally:
                roots.discard(key)
        finally:
            os.close(fd)  # closing releases the lock


@lru_cache(maxsize=64)
def shared_mount(root: str) -> bool:
    """Whether `root` lies on a filesystem other machines may mount too (by type, from /proc/self/mountinfo).

    Where the mount table cannot be read (not Linux), the folder is taken to be local, as before.
    """
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    fstype = mount_type(table, os.path.realpath(root))
    return fstype is not None and fstype not in LOCAL_FILESYSTEMS


def mount_type(mountinfo: str, path: str) -> str | None:
    """The filesystem type of the mount that holds the absolute `path`, per a mountinfo table (proc(5))."""
    best, found = -1, None
    for line in mountinfo.splitlines():
        fields, sep, rest = line.partition(" - ")
        parts = fields.split()
        if not sep or len(parts) < 5 or not rest.split():
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), parts[4])  # spaces come as \040
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # the longest mount point wins; of equal ones, the later (on top)
            best, found = len(point), rest.split()[0]
    return found


@contextmanager
def staged(dst: Path, kind: str) -> Iterator[Path]:
    """Steps 1 and 4: a hidden, locked folder beside `dst` for the caller to fill; removed on the way out."""
    if kind not in LEFTOVER_KINDS:
        raise ValueError(f"kind must be one of {LEFTOVER_KINDS}, got {kind!r}")
    root = dst.parent
    root.mkdir(parents=True, exist_ok=True)
    with ExitStack() as whole:
        shared = shared_mount(str(root))
        if shared:  # the lock for the whole write: a folder cannot carry a lock other machines see
            whole.enter_context(registry_lock(root))
        with registry_lock(root):
            tmp = root / f".{dst.name}.{kind}-{uuid.uuid4().hex[:12]}"
            tmp.mkdir()
            _writing.add(os.path.realpath(tmp))
            fd = None if shared else os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # held until we are done: `recover` leaves this folder alone
        try:
            yield tmp
        finally:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)
            _writing.discard(os.path.realpath(tmp))


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
            except OSError as e:  # there after all: copied in by hand (hand copies take no lock), or a network
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # mount's stale cache said it was not
                    raise
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
    second server (or a training run) writing into the same folder right now is not disturbed (on a
    shared mount, writers hold the registry lock throughout, so every leftover seen here is dead).
    """
    done: list[str] = []
    if not root.is_dir():
        return done
    with registry_lock(root):
        shared = shared_mount(str(root))
        leftovers = [(p, m) for p in root.iterdir() if (m := LEFTOVER_RE.fullmatch(p.name)) and p.is_dir()]
        # A lost name comes back from its newest `.old` copy; every other leftover is removed.
        leftovers.sort(key=lambda item: _mtime(item[0]), reverse=True)
        for path, match in leftovers:
            if os.path.realpath(path) in _writing or (not shared and _in_use(path)):
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
