"""A registry folder on a mount several machines share (NFS, EFS, CephFS, SMB) locks a regular file, not the folder.

Linux's NFS client keeps a directory's flock local to one machine, so replicas on different nodes would
not exclude each other; `heads.folders` therefore locks `.headserve.lock` there and holds it for a whole
write. These tests run that mode on a local folder (the lock semantics are the same) by declaring it shared.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

import heads.folders as folders
from heads.folders import LOCK_FILE, mount_type, recover, retire, staged, swap_in
from tests.unit.folder_versions import read_once, version_of, write_version

MOUNTINFO = "\n".join([
    "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
    "40 27 0:50 / /mnt/shared rw,relatime - nfs4 fs-1.efs.example:/ rw,vers=4.1",
    r"41 40 0:51 / /mnt/shared/with\040space rw - tmpfs tmpfs rw",
    "42 27 0:52 / /mnt/sharedother rw - xfs /dev/vdb rw",
    "43 27 0:53 / /mnt/sharedother rw - cifs //files/share rw",  # mounted on top of the one before
])


@pytest.mark.parametrize(("path", "fstype"), [
    ("/mnt/shared/registry", "nfs4"), ("/mnt/shared", "nfs4"), ("/home/me/registry", "ext4"),
    ("/mnt/shared/with space/registry", "tmpfs"), ("/mnt/sharedother/registry", "cifs"),
])
def test_the_mount_holding_a_path_is_the_longest_mount_point_above_it(path: str, fstype: str) -> None:
    assert mount_type(MOUNTINFO, path) == fstype


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(folders, "shared_mount", lambda root: True)


def lock_is_free(root: Path) -> bool:
    fd = os.open(root / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open: another owner, as another machine would be
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_a_write_holds_the_lock_file_from_staging_to_clean_up(tmp_path: Path, shared: None) -> None:
    with staged(tmp_path / "h", "upload") as tmp:
        assert not lock_is_free(tmp_path)  # so a `recover` elsewhere waits instead of taking this folder
        (tmp / "a").write_text("v1")
        (tmp / "b").write_text("v1")
        swap_in(tmp, tmp_path / "h")
        assert not lock_is_free(tmp_path)
    assert lock_is_free(tmp_path) and version_of(tmp_path / "h") == "v1"
    with staged(tmp_path / "h", "upload") as live:
        assert recover(tmp_path) == [] and live.is_dir()  # the lock is this thread's, the folder too: spared
    with pytest.raises(FileExistsError):
        write_version(tmp_path / "h", "v2", replace=False)
    retire(tmp_path / "h")
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # the lock file stays, on purpose


def test_racing_writers_and_recovery_leave_one_whole_version_and_no_leftovers(tmp_path: Path, shared: None) -> None:
    write_version(tmp_path / "h", "0")
    dead = tmp_path / ".h.upload-0123456789ab"  # a killed writer's folder: every leftover seen under the lock is dead
    dead.mkdir()
    stop, problems = threading.Event(), []

    def recovering() -> None:
        while not stop.is_set():
            recover(tmp_path)
            read_once(tmp_path / "h", problems)

    watcher = threading.Thread(target=recovering)
    watcher.start()
    writers = [threading.Thread(target=lambda i=i: [write_version(tmp_path / "h", f"{i}-{n}") for n in range(15)])
               for i in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    watcher.join()
    assert problems == []
    assert version_of(tmp_path / "h").endswith("-14")
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "h"]


def test_a_stale_not_there_still_refuses_to_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A network mount's cache may say a name is free that another machine just took: the rename then fails on
    the server (ENOTEMPTY), which must read as "taken" (409), not as an error (500)."""
    monkeypatch.setattr(folders, "_renameat2", None)  # NFS has no renameat2 flags: plain rename
    write_version(tmp_path / "h", "theirs")
    with staged(tmp_path / "h", "upload") as tmp:
        (tmp / "a").write_text("ours")
        (tmp / "b").write_text("ours")
        with monkeypatch.context() as m:
            m.setattr(os.path, "lexists", lambda path: False)
            with pytest.raises(FileExistsError):
                swap_in(tmp, tmp_path / "h", replace=False)
    assert version_of(tmp_path / "h") == "theirs"
