"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def head_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "my-head"
    folder.mkdir()
    (folder / "head_config.json").write_bytes(b'{"head_type": "backward_attention"}')
    (folder / "head.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      \x00\xff")
    return folder
