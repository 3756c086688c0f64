"""Identify a base model by content, so a head is never served on a base it was not trained on."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Config keys that change what the final hidden states mean; anything else (dropout, ids) does not.
FINGERPRINT_CONFIG_KEYS = ("model_type", "vocab_size", "n_embd", "hidden_size", "n_layer", "num_hidden_layers",
                           "n_head", "num_attention_heads", "n_positions", "max_position_embeddings")


def base_fingerprint(embeddings: torch.Tensor, config: dict[str, Any]) -> str:
    """sha256 over the selected config keys and the float32 bytes of the embedding matrix.

    Computed in float32 whatever the serving dtype, so a base loaded in bf16 on a GPU and in
    fp32 on a CPU agree as long as the fingerprint is taken before casting.
    """
    digest = hashlib.sha256()
    selected = {k: config[k] for k in FINGERPRINT_CONFIG_KEYS if k in config}
    digest.update(json.dumps(selected, sort_keys=True).encode())
    weights = embeddings.detach().to("cpu", torch.float32).contiguous()
    digest.update(weights.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def model_fingerprint(model: PreTrainedModel) -> str:
    """Fingerprint of a Hugging Face causal LM (anything with `config` and input embeddings)."""
    embeddings = model.get_input_embeddings().weight
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{type(model).__name__}: its input embeddings have no weight matrix to fingerprint")
    return base_fingerprint(embeddings, model.config.to_dict())
