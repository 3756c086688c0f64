"""Where the embedded base and the registry are found, in a checkout and once installed.

The installed layout itself is exercised by tests/e2e/test_install.py; these pin the rules: the embedded
base keeps one name wherever it lies, a missing one stops start-up with what to do, and only a new
default registry is seeded, never one a user named or already has.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError

import heads.base
import server.settings
from heads.base import EMBEDDED_BASE, EMBEDDED_NAME, REPO_ROOT, SHIPPED_HEADS, Base, check_base_location
from server.seed import seed_default_registry
from server.settings import Settings
from tests.shipped import shipped_heads


@pytest.fixture(autouse=True)
def _no_settings_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HEADSERVE_BASE_MODEL", "HEADSERVE_HEADS_DIR"):
        monkeypatch.delenv(name, raising=False)


def _base_named(name: str) -> Base:
    return Base(name=name, model=cast(Any, None), tokenizer=None, fingerprint="sha256:0", vocab_size=1, n_embd=1,
                n_positions=1)


def test_a_checkout_uses_its_committed_folders() -> None:
    assert heads.base.IN_CHECKOUT
    assert EMBEDDED_BASE == REPO_ROOT / "models" / "mini-gpt2" and SHIPPED_HEADS == REPO_ROOT / "registry"
    assert Settings(device="cpu").heads_dir == REPO_ROOT / "registry"
    assert Settings(device="cpu").base_model == str(EMBEDDED_BASE)


def test_the_embedded_base_has_one_name_wherever_it_lies(tmp_path: Path) -> None:
    assert _base_named(str(EMBEDDED_BASE)).info()["base_model_name_or_path"] == EMBEDDED_NAME
    elsewhere = tmp_path / "my-base"
    assert _base_named(str(elsewhere)).info()["base_model_name_or_path"] == str(elsewhere)
    assert _base_named("gpt2").info()["base_model_name_or_path"] == "gpt2"


def test_a_missing_embedded_base_says_where_and_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "site-packages" / "headserve" / "models" / "mini-gpt2"
    monkeypatch.setattr(heads.base, "EMBEDDED_BASE", missing)
    monkeypatch.setattr(server.settings, "EMBEDDED_BASE", missing)
    with pytest.raises(FileNotFoundError, match="embedded base not found at .*HEADSERVE_BASE_MODEL"):
        check_base_location(str(missing))
    with pytest.raises(ValidationError) as refused:
        Settings(device="cpu")  # the default: refused when the settings are built, before the server starts
    assert f"embedded base not found at {missing}" in str(refused.value)
    monkeypatch.setenv("HEADSERVE_BASE_MODEL", "gpt2")  # another base needs no embedded one
    assert Settings(device="cpu").base_model == "gpt2"


def test_a_local_folder_that_is_not_there_is_refused_but_hub_ids_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_base_location(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_base_location("./nowhere-at-all")
    for hub_id in ("gpt2", "openai-community/gpt2", str(EMBEDDED_BASE)):
        check_base_location(hub_id)


@pytest.fixture
def installed_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Settings as an installed server builds them: the default registry is ./registry where it starts."""
    monkeypatch.setattr(server.settings, "IN_CHECKOUT", False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work / "registry"


def test_an_installed_servers_default_registry_starts_as_the_shipped_heads(installed_default: Path) -> None:
    settings = Settings(device="cpu")
    assert settings.heads_dir == installed_default
    shipped = shipped_heads()
    assert seed_default_registry(settings) == shipped
    for name in shipped:
        for file in (SHIPPED_HEADS / name).iterdir():
            assert (installed_default / name / file.name).read_bytes() == file.read_bytes()
    assert [p.name for p in installed_default.parent.iterdir()] == ["registry"]  # no staging folder left
    shutil.rmtree(installed_default / "math")  # the user's registry from now on: never re-seeded
    assert seed_default_registry(Settings(device="cpu")) == []
    assert sorted(p.name for p in installed_default.iterdir()) == [name for name in shipped if name != "math"]


def test_a_registry_the_user_named_is_left_as_it_is(installed_default: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert seed_default_registry(Settings(device="cpu", heads_dir=tmp_path / "mine")) == []
    monkeypatch.setenv("HEADSERVE_HEADS_DIR", str(tmp_path / "from-env"))
    assert seed_default_registry(Settings(device="cpu")) == []
    assert not (tmp_path / "mine").exists() and not (tmp_path / "from-env").exists()
    assert not installed_default.exists()


def test_a_second_server_seeding_at_the_same_moment_keeps_the_first_ones(installed_default: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real_copytree = shutil.copytree

    def copy_while_another_server_seeds(*args: Any, **kwargs: Any) -> Any:
        (installed_default / "theirs").mkdir(parents=True, exist_ok=True)  # the other server won the race
        return real_copytree(*args, **kwargs)

    monkeypatch.setattr("server.seed.shutil.copytree", copy_while_another_server_seeds)
    assert seed_default_registry(Settings(device="cpu")) == []
    assert [p.name for p in installed_default.iterdir()] == ["theirs"]
    assert [p.name for p in installed_default.parent.iterdir()] == ["registry"]  # our half-copy removed
