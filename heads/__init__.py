"""Trainable output heads for a frozen GPT-2, and their safe on-disk format (see DESIGN.md)."""

from heads.backward_attention import BackwardAttentionConfig, BackwardAttentionHead
from heads.classifier import ClassifierConfig, ClassifierHead
from heads.errors import BaseMismatchError, HeadError, HeadFormatError, UnknownHeadTypeError
from heads.fingerprint import base_fingerprint, model_fingerprint
from heads.linear import LinearConfig, LinearHead
from heads.lowrank import LowRankConfig, LowRankHead, matched_rank
from heads.registry import HeadModule, get_head_type, head_type_names, register_head
from heads.storage import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    HeadMetadata,
    load_head,
    load_head_bytes,
    read_metadata,
    save_head,
)

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "BackwardAttentionConfig", "BackwardAttentionHead", "BaseMismatchError",
    "ClassifierConfig", "ClassifierHead", "HeadError", "HeadFormatError", "HeadMetadata", "HeadModule",
    "LinearConfig", "LinearHead", "LowRankConfig", "LowRankHead", "UnknownHeadTypeError", "base_fingerprint",
    "get_head_type", "head_type_names", "load_head", "load_head_bytes", "matched_rank", "model_fingerprint",
    "read_metadata", "register_head", "save_head",
]
