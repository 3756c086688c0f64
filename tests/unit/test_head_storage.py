"""Head folders on disk: exact round trips, atomic writes, and a clear error for every kind of bad file."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import heads.storage as storage
from heads import CONFIG_NAME, WEIGHTS_NAME, BackwardAttentionConfig, BackwardAttentionHead, LinearConfig, LinearHead
from heads.base import load_base
from heads.errors import BaseMismatchError, HeadFormatError, UnknownHeadTypeError
from heads.storage import load_head, load_head_bytes, read_metadata, save_head

V, D = 97, 24
BASE_INFO = {"base_model_name_or_path": "tiny/base", "base_fingerprint": "sha256:" + "ab" * 32}


def make_head(kind: str = "backward_attention", seed: int = 0, vocab_size: int = V, n_embd: int = D) -> nn.Module:
    torch.manual_seed(seed)
    head: nn.Module
    if kind == "linear":
        head = LinearHead(LinearConfig(bias=True), vocab_size=vocab_size, n_embd=n_embd)
    else:
        head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, num_heads=2, weighting="logits"),
                                     vocab_size=vocab_size, n_embd=n_embd)
    with torch.no_grad():
        for p in head.parameters():  # every tensor random, so a swapped or zeroed one shows
            p.add_(0.1 * torch.randn_like(p))
    return head.eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, D, generator=gen), torch.randn(V, D, generator=gen)


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("kind", ["backward_attention", "linear"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, kind: str) -> None:
    head = make_head(kind)
    save_head(head, tmp_path / "h", BASE_INFO)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded, meta = load_head(tmp_path / "h")
    assert type(loaded) is type(head) and meta.head_type == kind and not loaded.training
    assert loaded.config == head.config
    assert list(loaded.state_dict()) == list(head.state_dict()) and same_weights(loaded, head)
    hidden, emb = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(hidden, emb), head(hidden, emb))
    head.prepare(emb)
    loaded.prepare(emb)
    assert torch.equal(loaded.decode(hidden[:, -1]), head.decode(hidden[:, -1]))


def test_metadata_round_trip(tmp_path: Path) -> None:
    training = {"data": "train.jsonl", "steps": 12, "seed": 7, "final_metrics": {"loss": 1.25, "acc": 0.5}}
    template = "Problem: {problem}\nSolution:"
    saved = save_head(make_head(), tmp_path / "h", BASE_INFO, task="math", prompt_template=template,
                      training=training)
    _, meta = load_head(tmp_path / "h")
    assert meta == saved == read_metadata(tmp_path / "h")
    assert meta.task == "math" and meta.prompt_template == template and meta.training == training
    assert meta.base_fingerprint == BASE_INFO["base_fingerprint"]
    assert meta.base_model_name_or_path == BASE_INFO["base_model_name_or_path"]
    assert (meta.vocab_size, meta.n_embd, meta.format_version) == (V, D, storage.FORMAT_VERSION)
    assert meta.config == dataclasses.asdict(BackwardAttentionConfig(latent_dim=8, num_heads=2))
    assert datetime.fromisoformat(meta.created_at).tzinfo is not None
    text = (tmp_path / "h" / CONFIG_NAME).read_text()
    assert set(json.loads(text)) >= {"format_version", "head_type", "config", "task", "base_model_name_or_path",
                                     "base_fingerprint", "vocab_size", "n_embd", "created_at", "training",
                                     "prompt_template"}
    # head_config.json is written with indent=2 and sorted keys, nested objects included.
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert '\n  "base_fingerprint": ' in text and text.index('"data"') < text.index('"final_metrics"')


def test_same_weights_give_byte_identical_file(tmp_path: Path) -> None:
    save_head(make_head(), tmp_path / "a", BASE_INFO, task="one")
    save_head(make_head(), tmp_path / "b", {}, task="two")
    first = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    assert first == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()
    save_head(make_head(), tmp_path / "a", BASE_INFO)
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == first
    save_head(make_head(seed=1), tmp_path / "c", BASE_INFO)
    assert (tmp_path / "c" / WEIGHTS_NAME).read_bytes() != first


def test_save_over_existing_head_replaces_it(tmp_path: Path) -> None:
    out = tmp_path / "reg" / "h"
    save_head(make_head(seed=0), out, BASE_INFO, task="old")
    (out / "stray.txt").write_text("left over")
    new = make_head(seed=1)
    save_head(new, out, BASE_INFO, task="new")
    loaded, meta = load_head(out)
    assert meta.task == "new" and not (out / "stray.txt").exists()
    assert same_weights(loaded, new)
    assert siblings(out) == ["h"]  # no .h.tmp-* or .h.old-* left behind


@pytest.mark.parametrize("fail_on", [1, 2])
@pytest.mark.parametrize("existing", [True, False])
def test_crash_during_save_keeps_previous_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               fail_on: int, existing: bool) -> None:
    out = tmp_path / "h"
    old = make_head(seed=0)
    if existing:
        save_head(old, out, BASE_INFO, task="old")
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else {}
    real_write, calls = storage._write_synced, []

    def flaky_write(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if len(calls) == fail_on:
            real_write(path, data[: len(data) // 2])  # half a file hits the disk, then the "crash"
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(storage, "_write_synced", flaky_write)
    with pytest.raises(OSError, match="disk full"):
        save_head(make_head(seed=1), out, BASE_INFO, task="new")
    assert len(calls) == fail_on
    if existing:
        assert siblings(out) == ["h"] and {p.name: p.read_bytes() for p in out.iterdir()} == before
        loaded, meta = load_head(out)
        assert meta.task == "old" and same_weights(loaded, old)
    else:
        assert siblings(out) == []  # neither a half head nor a temp folder


def _edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        raw = json.loads((d / CONFIG_NAME).read_text())
        change(raw)
        (d / CONFIG_NAME).write_text(json.dumps(raw))
    return mutate


def _edit_tensors(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        tensors = load_file(d / WEIGHTS_NAME)
        change(tensors)
        save_file(tensors, d / WEIGHTS_NAME)
    return mutate


def _edit_weight_bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], object]:
    return lambda d: (d / WEIGHTS_NAME).write_bytes(change((d / WEIGHTS_NAME).read_bytes()))


def _set_tensor(key: str, value: torch.Tensor) -> Callable[[Path], None]:
    return _edit_tensors(lambda t: t.__setitem__(key, value))


def _set_field(key: str, value: object, in_config: bool = False) -> Callable[[Path], None]:
    return _edit_config(lambda r: (r["config"] if in_config else r).__setitem__(key, value))


NOT_SAFETENSORS = ["head.safetensors", "not a valid safetensors"]
BAD_FILES: dict[str, tuple[Callable[[Path], object], type[Exception], list[str]]] = {
    "truncated": (_edit_weight_bytes(lambda b: b[: len(b) // 2]), HeadFormatError, NOT_SAFETENSORS),
    "garbage": (_edit_weight_bytes(lambda b: random.Random(0).randbytes(4096)), HeadFormatError, NOT_SAFETENSORS),
    "missing_tensor": (_edit_tensors(lambda t: t.pop("query.weight")), HeadFormatError,
                       ["missing tensors", "query.weight"]),
    "extra_tensor": (_set_tensor("bonus", torch.zeros(3)), HeadFormatError, ["unexpected tensors", "bonus"]),
    "wrong_shape": (_set_tensor("key.weight", torch.zeros(3, 3)), HeadFormatError,
                    ["key.weight", "shape (3, 3)", "expected (8, 8)"]),
    "int_dtype": (_set_tensor("key.weight", torch.zeros(8, 8, dtype=torch.int32)), HeadFormatError,
                  ["key.weight", "dtype", "int32"]),
    "nan": (_set_tensor("key.weight", torch.full((8, 8), float("nan"))), HeadFormatError, ["key.weight", "NaN"]),
    "inf": (_set_tensor("value.weight", torch.eye(8) / 0), HeadFormatError, ["value.weight", "Inf"]),
    "unknown_head_type": (_set_field("head_type", "mystery"), UnknownHeadTypeError,
                          ["mystery", "backward_attention", "linear"]),
    "unknown_config_field": (_set_field("dropout", 0.1, True), HeadFormatError, ["unknown config fields", "dropout"]),
    "bad_config_value": (_set_field("weighting", "softmax", True), HeadFormatError, ["weighting", "softmax"]),
    "unknown_top_field": (_set_field("surprise", 1), HeadFormatError, ["unknown fields", "surprise"]),
    "format_version": (_set_field("format_version", 99), HeadFormatError, ["format_version 99", "not supported"]),
    "bad_template": (_set_field("prompt_template", "no slot"), HeadFormatError, ["prompt_template", "{problem}"]),
    "invalid_json": (lambda d: (d / CONFIG_NAME).write_text('{"head_type": '), HeadFormatError,
                     [CONFIG_NAME, "not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_head_files_raise_clear_errors(tmp_path: Path, case: str) -> None:
    mutate, exc, fragments = BAD_FILES[case]
    out = tmp_path / "h"
    save_head(make_head(), out, BASE_INFO)
    mutate(out)
    with pytest.raises(exc) as err:
        load_head(out)
    for fragment in [str(out), *fragments]:
        assert fragment in str(err.value), (fragment, str(err.value))
    with pytest.raises(exc) as err:
        load_head_bytes((out / CONFIG_NAME).read_bytes(), (out / WEIGHTS_NAME).read_bytes())
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_file_raises(tmp_path: Path, missing: str) -> None:
    save_head(make_head(), tmp_path / "h", BASE_INFO)
    (tmp_path / "h" / missing).unlink()
    with pytest.raises(HeadFormatError, match=rf"{missing}: missing"):
        load_head(tmp_path / "h")
    with pytest.raises(HeadFormatError, match="not a head folder"):
        load_head(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def bases(tiny_base_dir, other_base_dir):  # type: ignore[no-untyped-def]
    return load_base(str(tiny_base_dir)), load_base(str(other_base_dir))


def test_base_fingerprint_mismatch_names_both(tmp_path: Path, bases) -> None:  # type: ignore[no-untyped-def]
    tiny, other = bases
    assert tiny.fingerprint != other.fingerprint and (tiny.vocab_size, tiny.n_embd) == (other.vocab_size, other.n_embd)
    out = tmp_path / "h"
    save_head(make_head(vocab_size=tiny.vocab_size, n_embd=tiny.n_embd), out, tiny.info())
    _, meta = load_head(out, fingerprint=tiny.fingerprint, vocab_size=tiny.vocab_size, n_embd=tiny.n_embd)
    assert meta.base_fingerprint == tiny.fingerprint
    config, weights = (out / CONFIG_NAME).read_bytes(), (out / WEIGHTS_NAME).read_bytes()
    for load in (lambda: load_head(out, fingerprint=other.fingerprint),
                 lambda: load_head_bytes(config, weights, fingerprint=other.fingerprint)):
        with pytest.raises(BaseMismatchError) as err:
            load()
        assert tiny.fingerprint in str(err.value) and other.fingerprint in str(err.value)
    save_head(make_head(), tmp_path / "anon", {})  # no fingerprint recorded: refused once one is required
    load_head(tmp_path / "anon")
    with pytest.raises(BaseMismatchError, match=r"no fingerprint recorded.*sha256:ff"):
        load_head(tmp_path / "anon", fingerprint="sha256:ff")


@pytest.mark.parametrize(("field", "saved", "wanted"), [("vocab_size", V, V + 1), ("n_embd", D, D - 1)])
def test_size_mismatch(tmp_path: Path, field: str, saved: int, wanted: int) -> None:
    save_head(make_head(), tmp_path / "h", BASE_INFO)
    config, weights = (tmp_path / "h" / CONFIG_NAME).read_bytes(), (tmp_path / "h" / WEIGHTS_NAME).read_bytes()
    message = rf"{field} {saved} does not match the base's {wanted}"
    with pytest.raises(BaseMismatchError, match=message):
        load_head(tmp_path / "h", **{field: wanted})
    with pytest.raises(BaseMismatchError, match=message):
        load_head_bytes(config, weights, **{field: wanted})
