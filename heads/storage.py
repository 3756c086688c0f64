"""PEFT-like head folders: `head_config.json` + `head.safetensors`, written atomically, loaded warily.

Nothing here unpickles: tensors come only through safetensors, and every name, shape, dtype and
value is checked against what the config says before the module sees it. Sizes are checked before
they are paid for: the config file's bytes and JSON depth before parsing; the sizes its config
implies (each kind's `parameter_count`, bounded per kind and by `max_head_parameters`) before any
tensor exists; the weights file's size against those parameters before it is read. Writes follow
the steps in `heads.folders`, so a crash leaves the previous folder or the new one, never half.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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

from heads.classifier import check_verbalizer
from heads.errors import BaseMismatchError, HeadError, HeadFormatError
from heads.folders import staged, swap_in, sync_dir
from heads.prompts import DEFAULT_PROMPT_TEMPLATE, PROMPT_FORMATS, PROMPT_PLACEHOLDER, PromptFormat, PromptStyle
from heads.registry import HeadModule, get_head_type

CONFIG_NAME = "head_config.json"
WEIGHTS_NAME = "head.safetensors"
FORMAT_VERSION = 1
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CONFIG_BYTES = 1024 * 1024  # head_config.json holds a config and a training summary: kilobytes
MAX_JSON_DEPTH = 16  # ours nest 3 deep (training.final_metrics); deeper JSON only costs stack to parse and echo
MAX_WEIGHTS_HEADER_BYTES = 64 * 1024  # a safetensors header: names, dtypes, shapes and offsets of a few tensors
VERBALIZER_FIELDS = ("labels", "label_token_ids")
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)  # strings (skipped whole) and brackets


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
    prompt_format: PromptFormat = "plain"  # "chat": the filled template is the user message (heads.prompts)
    training: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION
    # A verbalizer (heads.classifier): a generative head trained to answer with label words records the label
    # names and the first token of each word; it classifies by its logits on those tokens. Both or neither.
    labels: list[str] | None = None
    label_token_ids: list[int] | None = None

    def to_json(self) -> str:
        """The config file; the verbalizer fields only when set, so other heads' files read as before."""
        data = dataclasses.asdict(self)
        for name in VERBALIZER_FIELDS:
            if data[name] is None:
                del data[name]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @property
    def prompt_style(self) -> PromptStyle:
        """How prompts for this head are formatted: as it was trained."""
        return PromptStyle(self.prompt_template, self.prompt_format)


def config_from_dict(config_cls: type[Any], data: Mapping[str, Any], source: str = CONFIG_NAME) -> Any:
    """Build a head config, refusing unknown fields and values its `validate()` rejects."""
    if not isinstance(data, Mapping):
        raise HeadFormatError(f"{source}: 'config' must be an object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise HeadFormatError(f"{source}: unknown config fields {unknown} for {config_cls.__name__}")
    config = config_cls(**data)
    try:
        config.validate()
    except ValueError as e:
        raise HeadFormatError(f"{source}: {e}") from None
    return config


def save_head(head: HeadModule, out_dir: str | os.PathLike[str], base_info: Mapping[str, Any] | None = None, *,
              task: str = "", prompt_template: str = DEFAULT_PROMPT_TEMPLATE, prompt_format: PromptFormat = "plain",
              training: Mapping[str, Any] | None = None, extra_files: Mapping[str, bytes] | None = None,
              labels: list[str] | None = None, label_token_ids: list[int] | None = None) -> HeadMetadata:
    """Write the head folder atomically: a crash leaves the previous folder or none, never half a head.

    `base_info` carries `base_model_name_or_path` and `base_fingerprint` of the base the head
    was trained on. The safetensors bytes depend only on the weights (no timestamps), so the
    same training run reproduces the same file. `extra_files` (name -> bytes, e.g. a training run's
    loss curve) go into the same folder before the swap, so the head never changes once visible.
    `labels` and `label_token_ids` make a generative head a verbalizer (ValueError where a load would refuse them).
    """
    check_verbalizer_of(head.head_type, labels, label_token_ids, head.vocab_size)
    out = Path(out_dir)
    base_info = dict(base_info or {})
    meta = HeadMetadata(
        head_type=head.head_type, config=dataclasses.asdict(head.config), vocab_size=head.vocab_size,
        n_embd=head.n_embd, task=task, base_model_name_or_path=base_info.get("base_model_name_or_path"),
        base_fingerprint=base_info.get("base_fingerprint"), prompt_template=prompt_template,
        prompt_format=prompt_format, training=dict(training or {}), labels=labels, label_token_ids=label_token_ids,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in head.state_dict().items()}
    with staged(out, "tmp") as tmp:
        for name, data in (extra_files or {}).items():
            _write_synced(tmp / Path(name).name, data)
        write_files(tmp, meta.to_json().encode(), save_safetensors_bytes(tensors))
        swap_in(tmp, out)
    return meta


def write_files(folder: Path, config_bytes: bytes, weights_bytes: bytes) -> None:
    """Both files of a head into a staged folder, each fsynced, then the folder itself: durable before the swap."""
    _write_synced(folder / WEIGHTS_NAME, weights_bytes)
    _write_synced(folder / CONFIG_NAME, config_bytes)
    sync_dir(folder)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_metadata(head_dir: str | os.PathLike[str]) -> HeadMetadata:
    """Parse and check head_config.json alone (cheap: listing a registry never reads tensors)."""
    path = Path(head_dir) / CONFIG_NAME
    if not path.is_file():
        raise HeadFormatError(f"{path}: missing (a head folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    return parse_metadata(read_bounded(path, MAX_CONFIG_BYTES), source=str(path))


def read_bounded(path: Path, limit: int) -> bytes:
    """The file's bytes, refusing one over `limit` bytes from its size alone (and never reading past it)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise HeadFormatError(f"{path.name}: {size} bytes, over the limit of {limit} bytes")
        data = f.read(size + 1)  # one byte more shows a file that grew meanwhile
    if len(data) > limit:
        raise HeadFormatError(f"{path.name}: more than {limit} bytes")
    return data


def parse_metadata(config_bytes: bytes, source: str = CONFIG_NAME) -> HeadMetadata:
    """head_config.json bytes -> checked metadata; every failure names the field at fault.

    What comes back is safe to show (bounded depth, finite numbers, the right types) and its config
    is valid for its kind within the kind's size bounds, so listing a head can never fail later.
    """
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise HeadFormatError(f"{source}: {len(config_bytes)} bytes, over the limit of {MAX_CONFIG_BYTES} bytes")
    check_json_depth(config_bytes, source)
    try:
        raw = json.loads(config_bytes.decode(), parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise HeadFormatError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise HeadFormatError(f"{source}: must hold a JSON object")
    try:  # JSON escapes can spell lone surrogates, which no UTF-8 answer (or file) can carry
        json.dumps(raw, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise HeadFormatError(f"{source}: holds text that is not valid Unicode (a lone surrogate escape)") from None
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
    if PROMPT_PLACEHOLDER not in template:
        raise HeadFormatError(f"{source}: prompt_template must contain the placeholder {{problem}}")
    if raw.get("prompt_format", "plain") not in PROMPT_FORMATS:
        raise HeadFormatError(f"{source}: prompt_format must be one of {list(PROMPT_FORMATS)}, "
                              f"got {raw['prompt_format']!r}")
    meta = HeadMetadata(**raw)
    head_parameters(meta, source)  # the config is an object, valid for its kind, within its bounds
    try:
        check_verbalizer_of(meta.head_type, meta.labels, meta.label_token_ids, meta.vocab_size)
    except ValueError as e:
        raise HeadFormatError(f"{source}: {e}") from None
    return meta


def check_verbalizer_of(head_type: str, labels: object, label_token_ids: object, vocab_size: int) -> None:
    """ValueError unless the verbalizer fields are absent, or valid (heads.classifier.check_verbalizer) on a head
    that decodes tokens: a classifier's labels are in its own config."""
    check_verbalizer(labels, label_token_ids, vocab_size)
    if labels is not None and not get_head_type(head_type).generative:
        raise ValueError(f"labels and label_token_ids are for generative heads; a {head_type!r} head names its "
                         "labels in its config")


def check_json_depth(data: bytes, source: str = CONFIG_NAME) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH before parsing it, so nothing ever recurses on it.

    Strings are skipped whole (brackets inside them do not count); the scan stops at the first
    bracket past the bound, so a nesting bomb costs a few dozen steps.
    """
    depth = 0
    for token in _JSON_TOKENS.finditer(data):
        first = token.group()[:1]
        if first in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise HeadFormatError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif first in (b"]", b"}"):
            depth -= 1


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a float")
    return value


def max_head_parameters(vocab_size: int, n_embd: int) -> int:
    """The most parameters any head may have on a (V, D) base: two LM-head-sized matrices (V x D) plus
    mixing matrices up to 8 D wide. Past that a "head" is a model; every kind's own bounds stay below."""
    return 2 * vocab_size * n_embd + 64 * n_embd * n_embd


def head_parameters(meta: HeadMetadata, source: str = CONFIG_NAME) -> int:
    """How many parameters the metadata's config implies; HeadFormatError if the config is invalid for
    its kind or past the bounds. Arithmetic only: nothing is allocated."""
    kind = get_head_type(meta.head_type)  # UnknownHeadTypeError names the known kinds
    config = config_from_dict(kind.config_cls, meta.config, source)
    try:
        count = int(config.parameter_count(meta.vocab_size, meta.n_embd))
    except ValueError as e:
        raise HeadFormatError(f"{source}: {e}") from None
    limit = max_head_parameters(meta.vocab_size, meta.n_embd)
    if count > limit:
        raise HeadFormatError(f"{source}: the config implies {count} parameters, over the bound of {limit} "
                              "(2 x vocab_size x n_embd + 64 x n_embd^2)")
    return count


def max_weights_bytes(meta: HeadMetadata) -> int:
    """The largest head.safetensors its config allows: every parameter in float32, plus the header."""
    return 8 + MAX_WEIGHTS_HEADER_BYTES + 4 * head_parameters(meta)


def check_weights_size(meta: HeadMetadata, size: int, source: str = WEIGHTS_NAME) -> None:
    """Refuse a weights file too big for its config from its size alone, before reading it."""
    limit = max_weights_bytes(meta)
    if size > limit:
        raise HeadFormatError(f"{source}: {size} bytes, but the config's {head_parameters(meta)} parameters "
                              f"take at most {limit} bytes")


def build_head(meta: HeadMetadata) -> HeadModule:
    """An untrained module of the kind and shape the metadata describes (its sizes already bounded)."""
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
    # The fingerprint first: for a head of another base, naming both bases says more than a shape that differs.
    if fingerprint is not None and meta.base_fingerprint != fingerprint:
        raise BaseMismatchError(f"head was trained on base {meta.base_fingerprint or '(no fingerprint recorded)'} "
                                f"({meta.base_model_name_or_path or 'unnamed'}), but the loaded base is {fingerprint}")
    if vocab_size is not None and meta.vocab_size != vocab_size:
        raise BaseMismatchError(f"head vocab_size {meta.vocab_size} does not match the base's {vocab_size}")
    if n_embd is not None and meta.n_embd != n_embd:
        raise BaseMismatchError(f"head n_embd {meta.n_embd} does not match the base's {n_embd}")


def load_head_bytes(config_bytes: bytes, weights_bytes: bytes, *, fingerprint: str | None = None,
                    vocab_size: int | None = None, n_embd: int | None = None) -> tuple[HeadModule, HeadMetadata]:
    """Validate and build a head from raw file contents (uploads are checked before touching disk)."""
    meta = parse_metadata(config_bytes)
    check_base(meta, fingerprint=fingerprint, vocab_size=vocab_size, n_embd=n_embd)
    check_weights_size(meta, len(weights_bytes))
    return _build_loaded(meta, weights_bytes), meta


def _build_loaded(meta: HeadMetadata, weights_bytes: bytes) -> HeadModule:
    module = build_head(meta)
    try:
        tensors = load_safetensors_bytes(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise HeadFormatError(f"{WEIGHTS_NAME}: not a valid safetensors file ({e})") from None
    check_tensors(tensors, module)
    target = next(iter(module.state_dict().values())).dtype
    module.load_state_dict({k: v.to(target) for k, v in tensors.items()}, strict=True)
    module.eval()
    return module


def load_head(head_dir: str | os.PathLike[str], *, fingerprint: str | None = None, vocab_size: int | None = None,
              n_embd: int | None = None) -> tuple[HeadModule, HeadMetadata]:
    """Load a head folder; with `fingerprint` (and sizes) given, refuse heads made for another base.

    The config is read and checked (against the base too) first; the weights file is read only once
    its size fits what the config implies.
    """
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
        meta = parse_metadata(read_bounded(config_path, MAX_CONFIG_BYTES))
        check_base(meta, fingerprint=fingerprint, vocab_size=vocab_size, n_embd=n_embd)
        return _build_loaded(meta, read_bounded(weights, max_weights_bytes(meta))), meta
    except HeadError as e:
        raise type(e)(f"{path}: {e}") from None
