"""The frozen base model: loaded once, fingerprinted, and asked only for final hidden states.

Shared by `training/` and `server/` so both see the same base the same way. Any Hugging Face
causal LM folder or hub id with tied input embeddings works; the default is the embedded
mini GPT-2 committed under `models/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from heads.fingerprint import model_fingerprint

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_BASE = REPO_ROOT / "models" / "mini-gpt2"


def default_base() -> str:
    """`HEADSERVE_BASE_MODEL` if set (e.g. `gpt2`), else the embedded mini GPT-2."""
    return os.environ.get("HEADSERVE_BASE_MODEL") or str(EMBEDDED_BASE)


@dataclass
class Base:
    name: str
    model: nn.Module  # the full causal LM; its LM head is the "linear" baseline
    tokenizer: Any
    fingerprint: str
    vocab_size: int
    n_embd: int
    n_positions: int

    @property
    def embeddings(self) -> Tensor:
        """(V, D) token embeddings: the backward-attention head's keys and values."""
        return self.model.get_input_embeddings().weight  # type: ignore[operator,no-any-return]

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def info(self) -> dict[str, str]:
        """What a head records about its base; the embedded base is named relative to the repo."""
        path = Path(self.name).resolve()
        name = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else self.name
        return {"base_model_name_or_path": name, "base_fingerprint": self.fingerprint}

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        """Run the transformer without its LM head; returns the HF output (last_hidden_state, past)."""
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def linear_logits(self, hidden: Tensor) -> Tensor:
        """The base's own LM head on (…, D) hidden states."""
        return self.model.get_output_embeddings()(hidden)  # type: ignore[operator,no-any-return]


def load_base(name_or_path: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> Base:
    """Load, freeze and fingerprint a base. Fingerprint is taken in float32 before any cast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path or default_base())
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
        raise ValueError(f"{name}: the base must tie its LM head to its input embeddings (GPT-2 does)")
    if getattr(out_emb, "bias", None) is not None:
        raise ValueError(f"{name}: an LM-head bias is not supported (GPT-2 has none)")
    fingerprint = model_fingerprint(model)
    model.to(device=device, dtype=dtype or torch.float32)
    cfg = model.config
    n_positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 1024)
    return Base(name=name, model=model, tokenizer=tokenizer, fingerprint=fingerprint,
                vocab_size=in_emb.weight.shape[0], n_embd=in_emb.weight.shape[1], n_positions=int(n_positions))
