"""Atomic head folders: a replaced name is never absent, a crash at any step loses nothing and what it
leaves is cleaned at start-up, and a live writer's folder is never taken for a leftover."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import heads.folders as folders
from heads.folders import recover, retire, staged, write_file_atomic
from tests.unit.folder_versions import read_once, version_of, write_version

FOLDERS_PY = Path(folders.__file__)


def make_version(root: Path, name: str, version: str) -> Path:
    """A folder holding two files that must always agree (a half-written head would not)."""
    out = root / name
    out.mkdir(parents=True)
    (out / "a").write_text(version)
    (out / "b").write_text(version)
    return out


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_and_create_leave_one_whole_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(folders, "_renameat2", None)  # the fallback: two renames
    write_version(tmp_path / "h", "v1")
    assert version_of(tmp_path / "h") == "v1"
    write_version(tmp_path / "h", "v2")
    assert version_of(tmp_path / "h") == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["h"]
    with pytest.raises(FileExistsError):
        write_version(tmp_path / "h", "v3", replace=False)
    assert version_of(tmp_path / "h") == "v2" and hidden(tmp_path) == []
    retire(tmp_path / "h")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        retire(tmp_path / "h")


def test_readers_never_see_a_replaced_name_missing_or_half_written(tmp_path: Path) -> None:
    write_version(tmp_path / "h", "0")
    stop, seen, problems = threading.Event(), set(), []

    def read() -> None:
        while not stop.is_set():
            version = read_once(tmp_path / "h", problems)
            if version is not None:
                seen.add(version)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    writers = [threading.Thread(target=lambda i=i: [write_version(tmp_path / "h", f"{i}-{n}") for n in range(30)])
               for i in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    for r in readers:
        r.join()
    assert problems == [] and len(seen) > 1 and hidden(tmp_path) == []


def test_recover_removes_leftovers_restores_a_lost_name_and_spares_live_writers(tmp_path: Path) -> None:
    make_version(tmp_path, "kept", "new")
    for leftover in (".kept.tmp-0a", ".kept.upload-1b", ".kept.deleted-2c", ".kept.old-3d", ".gone.upload-4e"):
        make_version(tmp_path, leftover, "junk")
    make_version(tmp_path, ".lost.old-5f", "old")  # the fallback's crash between its two renames
    make_version(tmp_path, ".lost.upload-6a", "unfinished")
    (tmp_path / ".git").mkdir()  # not ours: left alone
    with staged(tmp_path / "busy", "upload") as live:
        done = recover(tmp_path)
        assert live.is_dir()  # another writer's folder, flocked: spared
    assert version_of(tmp_path / "kept") == "new" and version_of(tmp_path / "lost") == "old"
    assert hidden(tmp_path) == [".git"]
    assert "restored 'lost' from .lost.old-5f" in done and len(done) == 7
    assert recover(tmp_path) == []


CRASH_SCRIPT = """
import importlib.util, os, signal, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("folders", {path!r})
folders = importlib.util.module_from_spec(spec)
spec.loader.exec_module(folders)
root, step = Path(sys.argv[1]), sys.argv[2]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

class Rename:  # os, with its n-th rename killing the process
    def __init__(self, n):
        self.n = n
    def __getattr__(self, name):
        return getattr(os, name)
    def rename(self, *args):
        self.n -= 1
        if self.n == 0:
            die()
        os.rename(*args)

class Shutil:
    rmtree = staticmethod(die)

if step == "delete-before-removal":
    folders.shutil = Shutil
    folders.retire(root / "h")
if step == "fallback-between-renames":
    folders._renameat2 = None
    folders.os = Rename(2)  # after the name is renamed away, before the new folder is renamed in
if step == "after-swap":
    folders.shutil = Shutil
with folders.staged(root / "h", "upload") as tmp:
    for part in "ab":
        (tmp / part).write_text("new")
    if step == "before-swap":
        die()
    folders.swap_in(tmp, root / "h")
"""


@pytest.mark.parametrize(("step", "after"), [("before-swap", "old"), ("fallback-between-renames", None),
                                             ("after-swap", "new"), ("delete-before-removal", "gone")])
def test_kill_9_at_each_step_loses_nothing_and_recover_cleans_up(tmp_path: Path, step: str,
                                                                 after: str | None) -> None:
    make_version(tmp_path, "h", "old")
    script = CRASH_SCRIPT.format(path=str(FOLDERS_PY))
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path), step], capture_output=True, timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    assert hidden(tmp_path), "the crash should have left something to clean"
    if after == "gone":
        assert not (tmp_path / "h").exists()  # the delete took effect with its one rename
    elif after is not None:
        assert version_of(tmp_path / "h") == after  # never absent, never half
    else:  # the fallback's documented window: absent until recovered
        assert not (tmp_path / "h").exists()
    recover(tmp_path)
    assert hidden(tmp_path) == []
    if after == "gone":
        assert list(tmp_path.iterdir()) == []
    else:
        assert version_of(tmp_path / "h") == (after or "old")


def test_staged_kinds_are_the_ones_recover_knows() -> None:
    with pytest.raises(ValueError, match="kind"):
        with staged(Path("/nonexistent/x"), "scratch"):
            pass
    assert all(folders.LEFTOVER_RE.fullmatch(f".a.b.{kind}-0f") for kind in folders.LEFTOVER_KINDS)


def test_write_file_atomic_replaces_whole_and_leaves_nothing_on_failure(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    write_file_atomic(target, b"old")
    write_file_atomic(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]

    def refuse(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("heads.folders.os.replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_file_atomic(target, b"half")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
