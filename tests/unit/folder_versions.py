"""Two-file folders whose files must always agree: what the atomic-folder tests write and read back."""

from __future__ import annotations

import os
from pathlib import Path

from heads.folders import staged, swap_in


def write_version(dst: Path, version: str, *, replace: bool = True) -> None:
    """Stage a folder holding `version` twice and swap it in, as a head upload does."""
    with staged(dst, "upload") as tmp:
        (tmp / "a").write_text(version)
        (tmp / "b").write_text(version)
        swap_in(tmp, dst, replace=replace)


def version_of(folder: Path) -> str:
    """The version a folder holds; fails if its two files disagree (a half-written head would)."""
    a, b = (folder / "a").read_text(), (folder / "b").read_text()
    assert a == b, f"half-written: {a!r} != {b!r}"
    return a


def read_at(folder_fd: int, name: str) -> bytes:
    """A file's first bytes through an open folder descriptor (what a reader that opened the folder sees)."""
    fd = os.open(name, os.O_RDONLY, dir_fd=folder_fd)
    try:
        return os.read(fd, 64)
    finally:
        os.close(fd)


def read_once(folder: Path, problems: list[str]) -> bytes | None:
    """Open the folder by name and read one version through it, as a reader racing writers does: a missing
    name or two files that disagree is a problem (recorded); an old version removed after its swap is None."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # the name: must always be there
    except FileNotFoundError:
        problems.append("the name was missing")
        return None
    try:  # one version's files, through the folder we opened
        a, b = (read_at(fd, part) for part in "ab")
    except FileNotFoundError:
        return None  # an old version, removed after its swap: a reader looks again
    finally:
        os.close(fd)
    if a != b:
        problems.append(f"half-written: {a!r} != {b!r}")
    return a
