"""A head's config is checked before it costs anything: sizes against bounds from the base, JSON depth,
types, and the weights file's size against what the config implies."""

from __future__ import annotations

import dataclasses
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from heads import CONFIG_NAME, WEIGHTS_NAME, BackwardAttentionConfig, BackwardAttentionHead, LinearConfig, LinearHead
from heads.errors import HeadFormatError
from heads.storage import (
    MAX_CONFIG_BYTES,
    MAX_JSON_DEPTH,
    HeadMetadata,
    head_parameters,
    load_head,
    load_head_bytes,
    max_head_parameters,
    max_weights_bytes,
    parse_metadata,
    read_metadata,
    save_head,
)

V, D = 97, 24
MB = 1024 * 1024


def config_json(head_type: str = "backward_attention", **changes: Any) -> dict[str, Any]:
    config = {"latent_dim": 8, "num_heads": 2} if head_type == "backward_attention" else {"bias": False}
    raw: dict[str, Any] = {"head_type": head_type, "config": config, "vocab_size": V, "n_embd": D,
                           "prompt_template": "{problem}", "training": {"final_metrics": {"loss": 1.0}}}
    raw.update(changes)
    return raw


def encode(raw: dict[str, Any]) -> bytes:
    return json.dumps(raw).encode()


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = {"x": value}
    return value


def refused(fn: Any) -> tuple[str, float, int]:
    """Run fn, which must raise HeadFormatError: its message, seconds and peak Python allocation in bytes."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(HeadFormatError) as err:
            fn()
        seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return str(err.value), seconds, peak


@pytest.mark.parametrize("config", [
    BackwardAttentionConfig(latent_dim=8, num_heads=2), BackwardAttentionConfig(latent_dim=None, residual=False),
    BackwardAttentionConfig(latent_dim=16, num_heads=3, head_dim=5, weighting="probs"),
    LinearConfig(bias=True), LinearConfig(bias=False)])
def test_parameter_count_is_what_the_module_allocates(config: Any) -> None:
    module: nn.Module = (LinearHead if isinstance(config, LinearConfig) else BackwardAttentionHead)(
        config, vocab_size=V, n_embd=D)
    assert config.parameter_count(V, D) == sum(p.numel() for p in module.parameters())
    assert config.parameter_count(V, D) <= max_head_parameters(V, D)


@pytest.mark.parametrize(("config", "fragment"), [
    ({"latent_dim": 10_000_000}, "latent_dim 10000000 is over the bound 96"),
    ({"latent_dim": 8, "num_heads": 10**9}, "num_heads x head_dim = 1000000000 is over the bound 96"),
    ({"latent_dim": 8, "head_dim": 10**12}, "is over the bound 96"),
    ({"latent_dim": None, "num_heads": 5, "head_dim": 20}, "num_heads x head_dim = 100"),
])
def test_config_bombs_are_refused_by_arithmetic(config: dict[str, Any], fragment: str) -> None:
    data = encode(config_json(config=config))
    assert len(data) < 1024
    message, seconds, peak = refused(lambda: parse_metadata(data))
    assert fragment in message
    assert seconds < 5 and peak < 1 * MB  # answered quickly, nothing allocated
    with pytest.raises(ValueError, match="over the bound"):  # nor can such a head be built for training
        BackwardAttentionHead(BackwardAttentionConfig(**config), vocab_size=V, n_embd=D)


@pytest.mark.parametrize("where", ["config", "training", "top"])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 980, 100_000])
def test_deep_json_is_refused_before_parsing(where: str, depth: int) -> None:
    raw = config_json()
    if where == "top":
        data = b"[" * depth + b"]" * depth
    else:
        raw[where] = nested(depth)
        data = json.dumps(raw).encode() if depth < 900 else _deep_text(raw, where, depth)
    message, seconds, peak = refused(lambda: parse_metadata(data))
    assert f"nested deeper than {MAX_JSON_DEPTH}" in message
    assert seconds < 5 and peak < 1 * MB


def _deep_text(raw: dict[str, Any], where: str, depth: int) -> bytes:
    """json.dumps itself recurses; build the nesting as text."""
    raw[where] = "HOLE"
    inner = '{"x": ' * (depth - 1) + "1" + "}" * (depth - 1)
    return json.dumps(raw).replace('"HOLE"', inner).encode()


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    raw = config_json(task="[[[[{{{{" * 10, training={"note": "]]]}}}" * 10, "escaped": '\\"[[[[[[[[[[[[[[[[[[[['})
    assert parse_metadata(encode(raw)).task == raw["task"]


@pytest.mark.parametrize(("config", "fragment"), [
    ([], "'config' must be an object, got list"), (None, "'config' must be an object, got NoneType"),
    ("latent", "'config' must be an object, got str"), ({"latent_dim": "64"}, "latent_dim must be a positive"),
    ({"latent_dim": 8, "num_heads": 2.5}, "num_heads must be a positive integer"),
    ({"latent_dim": 8, "eps": 0}, "eps must be a positive float"),
])
def test_config_of_the_wrong_type_is_refused_at_parse_time(config: Any, fragment: str) -> None:
    with pytest.raises(HeadFormatError, match="config|latent_dim|num_heads|eps") as err:
        parse_metadata(encode(config_json(config=config)))
    assert fragment in str(err.value)


@pytest.mark.parametrize(("text", "fragment"), [
    (b'{"head_type": "linear", "config": {}, "vocab_size": 97, "n_embd": 24, "training": {"x": NaN}}', "NaN"),
    (b'{"head_type": "linear", "config": {}, "vocab_size": 97, "n_embd": 24, "training": {"x": -Infinity}}',
     "Infinity"),
    (b'{"head_type": "linear", "config": {}, "vocab_size": 97, "n_embd": 24, "training": {"x": 1e999}}',
     "out of range"),
    (b'{"head_type": "linear", "config": {}, "vocab_size": 97, "n_embd": 24, "training": {"x": 1' + b"0" * 5000
     + b"}}", "not valid JSON"),
])
def test_numbers_json_cannot_echo_are_refused(text: bytes, fragment: str) -> None:
    with pytest.raises(HeadFormatError, match="not valid JSON") as err:
        parse_metadata(text)
    assert fragment in str(err.value)


def test_text_utf8_cannot_carry_is_refused() -> None:
    data = encode(config_json(task="@")).replace(b'"@"', b'"\\ud800"')  # a JSON escape for a lone surrogate
    with pytest.raises(HeadFormatError, match="lone surrogate"):
        parse_metadata(data)


def test_an_oversized_config_file_is_refused_from_its_size(tmp_path: Path) -> None:
    save_head(LinearHead(vocab_size=V, n_embd=D), tmp_path / "h")
    with open(tmp_path / "h" / CONFIG_NAME, "ab") as f:
        f.truncate(2 * 1024**3)  # sparse: 2 GB on paper, nothing on disk
    message, seconds, peak = refused(lambda: read_metadata(tmp_path / "h"))
    assert f"over the limit of {MAX_CONFIG_BYTES}" in message
    assert seconds < 5 and peak < 1 * MB


def test_an_oversized_weights_file_is_refused_without_being_read(tmp_path: Path) -> None:
    save_head(BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8), vocab_size=V, n_embd=D), tmp_path / "h")
    meta = read_metadata(tmp_path / "h")
    assert head_parameters(meta) < 1000 and max_weights_bytes(meta) < 100_000
    weights = tmp_path / "h" / WEIGHTS_NAME
    weights_size = weights.stat().st_size
    with open(weights, "ab") as f:
        f.truncate(weights_size + 2 * 1024**3)  # sparse: 2 GB more on paper, nothing on disk
    message, seconds, peak = refused(lambda: load_head(tmp_path / "h"))
    assert f"{WEIGHTS_NAME}: {2 * 1024**3 + weights_size} bytes" in message
    assert seconds < 5 and peak < 1 * MB
    config = (tmp_path / "h" / CONFIG_NAME).read_bytes()
    with pytest.raises(HeadFormatError, match="parameters take at most"):
        load_head_bytes(config, b"\0" * (max_weights_bytes(meta) + 1))


def test_the_total_bound_applies_to_every_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kind whose own bounds are lax still meets the registry-wide one."""
    monkeypatch.setattr(LinearConfig, "parameter_count", lambda self, v, d: 3 * v * d + 64 * d * d)
    with pytest.raises(HeadFormatError, match=r"parameters, over the bound of \d+ \(2 x vocab_size"):
        parse_metadata(encode(config_json("linear")))


def test_metadata_round_trips_through_the_checks() -> None:
    meta = parse_metadata(encode(config_json()))
    assert isinstance(meta, HeadMetadata) and dataclasses.asdict(meta)["config"] == {"latent_dim": 8, "num_heads": 2}
