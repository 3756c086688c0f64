"""Head kinds register themselves here; loaders look a kind up instead of branching on names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from heads.errors import UnknownHeadTypeError


class HeadConfig(Protocol):
    """What every head kind's config (a dataclass built from head_config.json) offers before any tensor exists."""

    def validate(self) -> None:
        """Raise ValueError naming the first field of the wrong type or value."""

    def parameter_count(self, vocab_size: int, n_embd: int) -> int:
        """Parameters the config implies on a (V, D) base; ValueError past the kind's size bounds."""


@dataclass(frozen=True)
class HeadType:
    name: str
    config_cls: type[Any]
    module_cls: type[nn.Module]


_HEAD_TYPES: dict[str, HeadType] = {}


def register_head(name: str, config_cls: type[Any], module_cls: type[nn.Module]) -> None:
    if name in _HEAD_TYPES and _HEAD_TYPES[name].module_cls is not module_cls:
        raise ValueError(f"head type {name!r} is already registered to {_HEAD_TYPES[name].module_cls.__name__}")
    _HEAD_TYPES[name] = HeadType(name, config_cls, module_cls)
    module_cls.head_type = name  # type: ignore[attr-defined]


def get_head_type(name: str) -> HeadType:
    try:
        return _HEAD_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(_HEAD_TYPES)) or "none"
        raise UnknownHeadTypeError(f"unknown head_type {name!r}; known types: {known}") from None


def head_type_names() -> list[str]:
    return sorted(_HEAD_TYPES)
