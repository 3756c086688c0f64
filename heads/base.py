"""The frozen base model: loaded once, fingerprinted, and asked only for final hidden states.

Shared by `training/` and `server/` so both see the same base the same way. Any Hugging Face
causal LM folder or hub id with tied input embeddings works, and so does a GGUF file or an alias
such as `smollm2-135m-instruct` (heads/base_sources.py converts those once into a cached folder);
the default is the embedded mini GPT-2 committed under `models/` (carried inside the `headserve`
package by a wheel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from heads.base_sources import base_names_help, resolve_base
from heads.errors import BaseNotFoundError
from heads.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REPO_ROOT = Path(__file__).resolve().parent.parent  # the source checkout; site-packages when installed
# A checkout (make serve, editable installs, the tests) reads models/ and registry/ where they are committed;
# a wheel carries both inside the `headserve` package (pyproject.toml maps them there), so an installed
# server needs no source tree.
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file()
DATA_ROOT = REPO_ROOT if IN_CHECKOUT else REPO_ROOT / "headserve"
EMBEDDED_NAME = "models/mini-gpt2"  # how heads and /readyz name the embedded base, wherever it lies
EMBEDDED_BASE = DATA_ROOT / EMBEDDED_NAME
SHIPPED_HEADS = DATA_ROOT / "registry"  # the committed heads: what a new registry starts with


def default_base() -> str:
    """`HEADSERVE_BASE_MODEL` if set (e.g. `gpt2`), else the embedded mini GPT-2."""
    return os.environ.get("HEADSERVE_BASE_MODEL") or str(EMBEDDED_BASE)


def check_base_location(name: str) -> None:
    """Refuse a base that names a local folder which is not there, saying what to do.

    Without this, transformers reads a missing folder as a malformed hub id ("Repo id must be in the
    form ...") and a server stays unready for ever. Only the embedded base and absolute or ./-relative
    paths are surely local: `gpt2` or `org/model` may be hub ids.
    """
    if Path(name) == EMBEDDED_BASE and not (EMBEDDED_BASE / "config.json").is_file():
        raise BaseNotFoundError(f"embedded base not found at {EMBEDDED_BASE}: install headserve with its data "
                                f"(a wheel or `pip install .` carries it) or set HEADSERVE_BASE_MODEL to "
                                f"{base_names_help()}")
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise BaseNotFoundError(f"base model folder {name} does not exist: set HEADSERVE_BASE_MODEL (or --base) to "
                                f"{base_names_help()}")


@dataclass
class Base:
    name: str
    model: PreTrainedModel  # the full causal LM; its LM head is the "linear" baseline
    tokenizer: Any
    fingerprint: str
    vocab_size: int
    n_embd: int
    n_positions: int

    @property
    def embeddings(self) -> Tensor:
        """(V, D) token embeddings: the backward-attention head's keys and values."""
        # nn.Module types attributes as Tensor | Module; load_base checked that this one is the (V, D) matrix.
        return cast(Tensor, self.model.get_input_embeddings().weight)

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def info(self) -> dict[str, str]:
        """What a head records about its base: the embedded base as `models/mini-gpt2` wherever it is
        installed, another folder or file of the checkout relative to it, anything else (a hub id, an alias
        such as `smollm2-135m-instruct`) as the user named it, so the record holds on every machine."""
        path = Path(self.name).resolve()
        if path == EMBEDDED_BASE.resolve():
            name = EMBEDDED_NAME
        elif IN_CHECKOUT and path.exists() and path.is_relative_to(REPO_ROOT):
            name = str(path.relative_to(REPO_ROOT))
        else:
            name = self.name
        return {"base_model_name_or_path": name, "base_fingerprint": self.fingerprint}

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        """Run the transformer without its LM head; returns the HF output (last_hidden_state, past)."""
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def linear_logits(self, hidden: Tensor) -> Tensor:
        """The base's own LM head on (…, D) hidden states."""
        return self.model.get_output_embeddings()(hidden)


def load_base(name_or_path: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None, cache_dir: Path | None = None) -> Base:
    """Load, freeze and fingerprint a base. Fingerprint is taken in float32 before any cast.

    A GGUF file or alias is read from its converted copy under `cache_dir` (default: HEADSERVE_CACHE_DIR or
    the user's cache), converted first if there is none; `Base.name` stays the name given.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path or default_base())
    source = resolve_base(name, cache_dir)
    check_base_location(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out_emb, weight = model.get_output_embeddings(), model.get_input_embeddings().weight  # weight: (V, D)
    if out_emb is None or not isinstance(weight, Tensor) or out_emb.weight.data_ptr() != weight.data_ptr():
        raise ValueError(f"{name}: the base must tie its LM head to its input embeddings (GPT-2 does)")
    if getattr(out_emb, "bias", None) is not None:
        raise ValueError(f"{name}: an LM-head bias is not supported (GPT-2 has none)")
    fingerprint = model_fingerprint(model)
    # Called through nn.Module's type: mypy misreads PreTrainedModel.to, wrapped by functools.wraps (python/mypy#17166).
    module: nn.Module = model
    module.to(device=device, dtype=dtype or torch.float32)
    cfg = model.config
    n_positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
    return Base(name=name, model=model, tokenizer=tokenizer, fingerprint=fingerprint,
                vocab_size=weight.shape[0], n_embd=weight.shape[1], n_positions=int(n_positions))
