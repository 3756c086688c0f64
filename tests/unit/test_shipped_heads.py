"""The shipped-head list (pyproject's package data) matches what git tracks under registry/ and what .gitignore
lets through, and every shipped head is a complete folder."""

from __future__ import annotations

import subprocess

from tests.shipped import REPO_ROOT, made_for, shipped_heads


def test_pyproject_packages_exactly_the_heads_git_tracks() -> None:
    tracked = subprocess.run(["git", "ls-files", "registry"], cwd=REPO_ROOT, check=True, capture_output=True,
                             text=True).stdout.split()
    folders = sorted({path.split("/")[1] for path in tracked})
    assert folders == shipped_heads()
    for name in folders:
        assert {p for p in tracked if p.startswith(f"registry/{name}/")} >= {
            f"registry/{name}/head_config.json", f"registry/{name}/head.safetensors"}


def test_gitignore_lets_every_shipped_head_through() -> None:
    allowed = {line.strip().removeprefix("!/registry/").rstrip("/") for line in
               (REPO_ROOT / ".gitignore").read_text().splitlines() if line.strip().startswith("!/registry/")}
    assert allowed == set(shipped_heads())


def test_every_shipped_head_names_its_base() -> None:
    assert {made_for(name) for name in shipped_heads()} <= {"models/mini-gpt2", "smollm2-135m-instruct"}
