"""Head kinds register themselves here against one contract (`HeadModule`); loaders look a kind up instead of
branching on names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import Field, dataclass
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from heads.errors import UnknownHeadTypeError


class HeadConfig(Protocol):
    """What every head kind's config (a dataclass built from head_config.json) offers before any tensor exists."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # a dataclass: head_config.json stores `asdict(config)`

    def validate(self) -> None:
        """Raise ValueError naming the first field of the wrong type or value."""

    def parameter_count(self, vocab_size: int, n_embd: int) -> int:
        """Parameters the config implies on a (V, D) base; ValueError past the kind's size bounds."""


def positive_int(value: object) -> bool:
    """A config field's integer check: JSON's true is an int to Python, and never a valid width."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_base_shape(vocab_size: int, n_embd: int) -> None:
    """Every kind's constructor refuses a base shape that cannot be, before it allocates anything."""
    if vocab_size < 1 or n_embd < 1:
        raise ValueError(f"vocab_size and n_embd must be positive, got {vocab_size} and {n_embd}")


class HeadModule(nn.Module, ABC):
    """The head contract (DESIGN.md): all that training, storage and serving may ask of a head of any kind.

    `forward` is the reference, used for training; `prepare` + `decode` is the serving path and must
    give the same logits (a test per kind proves it). Attributes are declared here because
    `nn.Module.__getattr__` would otherwise type every one of them as `Tensor | Module`.
    """

    head_type: ClassVar[str]  # the registered kind; register_head sets it
    # Whether the head gives next-token logits (`prepare` + `decode`), so it can generate text; a classifier's
    # label logits cannot, and whoever generates checks this instead of asking for a kind by name.
    generative: ClassVar[bool] = True
    config: HeadConfig  # the kind's own config dataclass
    vocab_size: int  # V of the base the head was built for
    n_embd: int  # D of the base the head was built for

    def _take_config(self, config: HeadConfig, vocab_size: int, n_embd: int) -> None:
        """Every kind's constructor starts here: the config valid, the base's shape possible and the kind's size
        bounds kept (a head too big to serve is refused before anything is allocated), then both recorded."""
        config.validate()
        check_base_shape(vocab_size, n_embd)
        config.parameter_count(vocab_size, n_embd)
        self.config, self.vocab_size, self.n_embd = config, vocab_size, n_embd

    @abstractmethod
    def forward(self, hidden: Tensor, embeddings: Tensor) -> Tensor:
        """(B, T, D) final hidden states and the base's (V, D) embeddings -> (B, T, V) logits."""

    @abstractmethod
    def prepare(self, embeddings: Tensor) -> None:
        """Build whatever `decode` caches from the weights and the base's embeddings."""

    @abstractmethod
    def decode(self, hidden_last: Tensor, base_logits: Tensor | None = None) -> Tensor:
        """(B, D) last hidden states -> (B, V) logits, equal to `forward` on the same rows. A caller that has
        the base's own (B, V) logits of the rows may pass them when `accepts_base_logits` says they are used."""

    @abstractmethod
    def release(self) -> None:
        """Drop what `prepare` cached."""

    @property
    def accepts_base_logits(self) -> bool:
        """Whether `decode` uses the base's logits, so that a caller that has them saves the head a V x D product."""
        return False


@dataclass(frozen=True)
class HeadType:
    name: str
    config_cls: type[Any]
    module_cls: type[HeadModule]

    @property
    def generative(self) -> bool:
        """Whether heads of this kind decode text (known from the kind alone: from a head's metadata)."""
        return self.module_cls.generative


_HEAD_TYPES: dict[str, HeadType] = {}


def register_head(name: str, config_cls: type[Any], module_cls: type[HeadModule]) -> None:
    if name in _HEAD_TYPES and _HEAD_TYPES[name].module_cls is not module_cls:
        raise ValueError(f"head type {name!r} is already registered to {_HEAD_TYPES[name].module_cls.__name__}")
    _HEAD_TYPES[name] = HeadType(name, config_cls, module_cls)
    module_cls.head_type = name


def get_head_type(name: str) -> HeadType:
    try:
        return _HEAD_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(_HEAD_TYPES)) or "none"
        raise UnknownHeadTypeError(f"unknown head_type {name!r}; known types: {known}") from None


def head_type_names(generative: bool | None = None) -> list[str]:
    """The registered kinds; only those that generate text (True) or only those that do not (False)."""
    return sorted(name for name, kind in _HEAD_TYPES.items() if generative is None or kind.generative == generative)
