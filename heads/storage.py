"""PEFT-like head folders: `head_config.json` + `head.safetensors`, written atomically, loaded warily.

Nothing here unpickles: tensors come only through safetensors, and every name, shape, dtype and
value is checked against what the config says before the module sees it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from heads.errors import BaseMismatchError, HeadError, HeadFormatError
from heads.registry import get_head_type

CONFIG_NAME = "head_config.json"
WEIGHTS_NAME = "head.safetensors"
FORMAT_VERSION = 1
DEFAULT_PROMPT_TEMPLATE = "{problem}"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class HeadMetadata:
    """Everything in head_config.json except the tensors; `config` is the head kind's own config."""

    head_type: str
    config: dict[str, Any]
    vocab_size: int
    n_embd: int
    task: str = ""
    base_model_name_or_path: str | None = None
    base_fingerprint: str | None = None
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    training: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


def config_from_dict(config_cls: type[Any], data: Mapping[str, Any]) -> Any:
    """Build a head config, refusing unknown fields and values its `validate()` rejects."""
    if not isinstance(data, Mapping):
        raise HeadFormatError(f"{CONFIG_NAME}: 'config' must be an object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise HeadFormatError(f"{CONFIG_NAME}: unknown config fields {unknown} for {config_cls.__name__}")
    config = config_cls(**data)
    try:
        config.validate()
    except ValueError as e:
        raise HeadFormatError(f"{CONFIG_NAME}: {e}") from None
    return config


def save_head(head: nn.Module, out_dir: str | os.PathLike[str], base_info: Mapping[str, Any] | None = None, *,
              task: str = "", prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
              training: Mapping[str, Any] | None = None) -> HeadMetadata:
    """Write the head folder atomically: a crash leaves the previous folder or none, never half a head.

    `base_info` carries `base_model_name_or_path` and `base_fingerprint` of the base the head
    was trained on. The safetensors bytes depend only on the weights (no timestamps), so the
    same training run reproduces the same file.
    """
    out = Path(out_dir)
    base_info = dict(base_info or {})
    meta = HeadMetadata(
        head_type=head.head_type, config=dataclasses.asdict(head.config), vocab_size=head.vocab_size,
        n_embd=head.n_embd, task=task, base_model_name_or_path=base_info.get("base_model_name_or_path"),
        base_fingerprint=base_info.get("base_fingerprint"), prompt_template=prompt_template,
        training=dict(training or {}), created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in head.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_synced(tmp / WEIGHTS_NAME, save_safetensors_bytes(tensors))
        _write_synced(tmp / CONFIG_NAME, meta.to_json().encode())
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an existing `dst` is swapped out, then removed."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


def read_metadata(head_dir: str | os.PathLike[str]) -> HeadMetadata:
    """Parse and check head_config.json alone (cheap: listing a registry never reads tensors)."""
    path = Path(head_dir) / CONFIG_NAME
    if not path.is_file():
        raise HeadFormatError(f"{path}: missing (a head folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    return parse_metadata(path.read_bytes(), source=str(path))


def parse_metadata(config_bytes: bytes, source: str = CONFIG_NAME) -> HeadMetadata:
    """head_config.json bytes -> checked metadata; every failure names the field at fault."""
    try:
        raw = json.loads(config_bytes.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadFormatError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise HeadFormatError(f"{source}: must hold a JSON object")
    known = {f.name for f in dataclasses.fields(HeadMetadata)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise HeadFormatError(f"{source}: unknown fields {unknown}")
    for name in ("head_type", "config", "vocab_size", "n_embd"):
        if name not in raw:
            raise HeadFormatError(f"{source}: missing required field {name!r}")
    version = raw.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise HeadFormatError(f"{source}: format_version {raw['format_version']!r} is not supported "
                              f"(this build reads {FORMAT_VERSION})")
    for name in ("vocab_size", "n_embd"):
        if not isinstance(raw[name], int) or isinstance(raw[name], bool) or raw[name] < 1:
            raise HeadFormatError(f"{source}: {name} must be a positive integer, got {raw[name]!r}")
    for name in ("head_type", "task", "prompt_template", "created_at"):
        if name in raw and not isinstance(raw[name], str):
            raise HeadFormatError(f"{source}: {name} must be a string, got {type(raw[name]).__name__}")
    for name in ("base_model_name_or_path", "base_fingerprint"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise HeadFormatError(f"{source}: {name} must be a string or null")
    if not isinstance(raw.get("training", {}), dict):
        raise HeadFormatError(f"{source}: training must be an object")
    template = raw.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    if "{problem}" not in template:
        raise HeadFormatError(f"{source}: prompt_template must contain the placeholder {{problem}}")
    get_head_type(raw["head_type"])  # UnknownHeadTypeError names the known kinds
    return HeadMetadata(**raw)


def build_head(meta: HeadMetadata) -> nn.Module:
    """An untrained module of the kind and shape the metadata describes."""
    kind = get_head_type(meta.head_type)
    config = config_from_dict(kind.config_cls, meta.config)
    try:
        return kind.module_cls(config, vocab_size=meta.vocab_size, n_embd=meta.n_embd)
    except ValueError as e:
        raise HeadFormatError(f"{CONFIG_NAME}: {e}") from None


def check_tensors(tensors: Mapping[str, torch.Tensor], module: nn.Module) -> None:
    """Every expected tensor present, none extra, right shape, floating dtype, all finite."""
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        raise HeadFormatError(f"{WEIGHTS_NAME}: missing tensors {missing}")
    if extra:
        raise HeadFormatError(f"{WEIGHTS_NAME}: unexpected tensors {extra}")
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise HeadFormatError(f"{WEIGHTS_NAME}: tensor {name!r} has shape {tuple(got.shape)}, "
                                  f"expected {tuple(want.shape)}")
        if got.dtype not in FLOAT_DTYPES:
            raise HeadFormatError(f"{WEIGHTS_NAME}: tensor {name!r} has dtype {got.dtype}, expected a float dtype")
        if not bool(torch.isfinite(got).all()):
            raise HeadFormatError(f"{WEIGHTS_NAME}: tensor {name!r} holds NaN or Inf values")


def check_base(meta: HeadMetadata, *, fingerprint: str | None, vocab_size: int | None = None,
               n_embd: int | None = None) -> None:
    """Refuse a head trained on another base; the message names both fingerprints."""
    if vocab_size is not None and meta.vocab_size != vocab_size:
        raise BaseMismatchError(f"head vocab_size {meta.vocab_size} does not match the base's {vocab_size}")
    if n_embd is not None and meta.n_embd != n_embd:
        raise BaseMismatchError(f"head n_embd {meta.n_embd} does not match the base's {n_embd}")
    if fingerprint is not None and meta.base_fingerprint != fingerprint:
        raise BaseMismatchError(f"head was trained on base {meta.base_fingerprint or '(no fingerprint recorded)'} "
                                f"({meta.base_model_name_or_path or 'unnamed'}), but the loaded base is {fingerprint}")


def load_head_bytes(config_bytes: bytes, weights_bytes: bytes, *, fingerprint: str | None = None,
                    vocab_size: int | None = None, n_embd: int | None = None) -> tuple[nn.Module, HeadMetadata]:
    """Validate and build a head from raw file contents (uploads are checked before touching disk)."""
    meta = parse_metadata(config_bytes)
    check_base(meta, fingerprint=fingerprint, vocab_size=vocab_size, n_embd=n_embd)
    module = build_head(meta)
    try:
        tensors = load_safetensors_bytes(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise HeadFormatError(f"{WEIGHTS_NAME}: not a valid safetensors file ({e})") from None
    check_tensors(tensors, module)
    target = next(iter(module.state_dict().values())).dtype
    module.load_state_dict({k: v.to(target) for k, v in tensors.items()}, strict=True)
    module.eval()
    return module, meta


def load_head(head_dir: str | os.PathLike[str], *, fingerprint: str | None = None, vocab_size: int | None = None,
              n_embd: int | None = None) -> tuple[nn.Module, HeadMetadata]:
    """Load a head folder; with `fingerprint` (and sizes) given, refuse heads made for another base."""
    path = Path(head_dir)
    if not path.is_dir():
        raise HeadFormatError(f"{path}: not a head folder")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise HeadFormatError(f"{weights}: missing")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise HeadFormatError(f"{config_path}: missing")
    try:
        return load_head_bytes(config_path.read_bytes(), weights.read_bytes(), fingerprint=fingerprint,
                               vocab_size=vocab_size, n_embd=n_embd)
    except HeadError as e:
        raise type(e)(f"{path}: {e}") from None
