"""The heads the project ships: one list, pyproject's package data for `headserve.registry`, that every test
asking "which heads are committed?" reads, so committing a head means editing pyproject (and .gitignore) only."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shipped_heads() -> list[str]:
    """Sorted names of the committed heads, as the wheel packages them."""
    # Read with a pattern, not tomllib: the project supports Python 3.10, which has no TOML reader.
    data = (REPO_ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    listed = re.search(r'^"headserve\.registry" = \[(.*?)\]', data, flags=re.MULTILINE | re.DOTALL)
    assert listed is not None, "pyproject.toml lists no package data for headserve.registry"
    return sorted(re.findall(r'"([^"/]+)/\*"', listed.group(1)))


def made_for(name: str) -> str:
    """The base a shipped head was trained on, as its metadata names it."""
    return str(json.loads((REPO_ROOT / "registry" / name / "head_config.json").read_text())["base_model_name_or_path"])
