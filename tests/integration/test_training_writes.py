"""Training writes its folders whole (issue 10, smaller defects).

`training.pretrain` used to delete the old base before renaming the new one in, so a crash between
the two lost it; `training.fit` wrote `loss_curve.png` into the head folder after the swap, so the
head changed (and its `bytes` grew) after a server had seen it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import heads.storage
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready
from training import fit, pretrain


class FakeSaver:
    """Stands in for a model or tokenizer: writes `files` into the folder, then optionally fails."""

    def __init__(self, files: dict[str, str], fail: BaseException | None = None) -> None:
        self.files, self.fail = files, fail

    def save_pretrained(self, folder: Path) -> None:
        for name, text in self.files.items():
            (Path(folder) / name).write_text(text)
        if self.fail is not None:
            raise self.fail


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


@pytest.fixture
def old_base(tmp_path: Path) -> Path:
    out = tmp_path / "models" / "mini"
    out.mkdir(parents=True)
    (out / "config.json").write_text("old config")
    (out / "model.safetensors").write_text("old weights")
    return out


@pytest.mark.parametrize("fail", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_pretrain_write_keeps_the_old_base(old_base: Path, fail: BaseException) -> None:
    before = contents(old_base)
    model = FakeSaver({"config.json": "new config", "model.safetensors": "new weights"})
    tokenizer = FakeSaver({"tokenizer.json": "new tokenizer"}, fail=fail)
    with pytest.raises(type(fail)):
        pretrain.write_base(old_base, model, tokenizer, {"steps": 1})  # type: ignore[arg-type]
    assert contents(old_base) == before
    assert sorted(p.name for p in old_base.parent.iterdir()) == ["mini"]  # no temporary folder left


def test_pretrain_swaps_the_new_base_in_only_once_it_is_complete(old_base: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    real_swap = pretrain.swap_in

    def watching(tmp: Path, dst: Path, **kwargs: Any) -> bool:
        seen["old_at_swap"], seen["new_at_swap"] = contents(dst), contents(tmp)
        return real_swap(tmp, dst, **kwargs)

    monkeypatch.setattr(pretrain, "swap_in", watching)
    model = FakeSaver({"config.json": "new config", "model.safetensors": "new weights"})
    pretrain.write_base(old_base, model, FakeSaver({"tokenizer.json": "new tokenizer"}),  # type: ignore[arg-type]
                        {"steps": 1})
    assert seen["old_at_swap"] == {"config.json": "old config", "model.safetensors": "old weights"}
    assert set(seen["new_at_swap"]) == {"config.json", "model.safetensors", "tokenizer.json", "provenance.json"}
    assert contents(old_base) == seen["new_at_swap"]
    assert sorted(p.name for p in old_base.parent.iterdir()) == ["mini"]


def test_the_loss_curve_is_in_the_head_folder_before_it_becomes_visible(
        tiny_base_dir: Path, synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "registry"
    swapped: list[set[str]] = []
    real_swap = heads.storage.swap_in

    def watching(tmp: Path, dst: Path, **kwargs: Any) -> bool:
        swapped.append({p.name for p in tmp.iterdir()})
        return real_swap(tmp, dst, **kwargs)

    monkeypatch.setattr(heads.storage, "swap_in", watching)
    fit.main(["--base", str(tiny_base_dir), "--data", str(synth_dir), "--task", "math", "--out", str(root / "math"),
              "--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--seed", "0"])
    assert swapped == [{"head_config.json", "head.safetensors", fit.LOSS_CURVE_NAME}]  # one swap, curve included
    folder = root / "math"
    assert (folder / fit.LOSS_CURVE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in root.iterdir()) == ["math"]

    # The head's `bytes` is every file of its folder, loss curve included, from the first listing on.
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    settings = Settings(base_model=str(tiny_base_dir), heads_dir=root, device="cpu")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        summary = client.get("/heads/math").json()
    assert summary["bytes"] == on_disk > (folder / fit.LOSS_CURVE_NAME).stat().st_size
