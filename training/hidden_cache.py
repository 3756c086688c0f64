"""The frozen base's hidden states at the positions that score a target, computed once and kept in 16 bits.

Why: a head is position-wise and the base never changes, so training and teacher-forced evaluation need
only `h_t` at the positions t whose next token is a target, never the base again. On SmolLM2 the base's
forward is nearly all of the cost (about 566 tok/s on 2 cores: an hour for GSM8K's train split), so
every head kind, epoch and temperature reuses one pass. Only target positions are kept (prompt rows
would cost space and nothing else), in float16: 2 bytes x D per target token, 220 MB for 2,000 GSM8K
problems on SmolLM2. On disk the pass is keyed by the base's fingerprint and the exact token ids, so a
second `training.fit` on the same data (another head kind) memory-maps it instead of running the base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from heads.base import Base
from heads.base_sources import default_cache_dir
from heads.folders import sync_dir
from training.data import collate

log = logging.getLogger(__name__)

Encoded = Sequence[tuple[list[int], int]]  # (ids, prompt_len), as training.data.encode gives them
HIDDEN_DIR = "hidden"  # under the cache root (HEADSERVE_CACHE_DIR or ~/.cache/headserve)
FORMAT = 1  # bump when the files' layout changes: a new key, so old passes are never misread
PASS_TOKENS = 4096  # tokens (padding included) per base forward in the pass
DEFAULT_CHUNK_ROWS = 1024  # rows per cross-entropy chunk: memory is chunk_rows x V floats, whatever the batch


@dataclass
class TargetStates:
    """`hidden[offsets[i]:offsets[i+1]]` (float16) are example i's states, `targets[...]` the tokens they predict."""

    hidden: np.ndarray  # (N, D) float16, in memory or memory-mapped
    targets: np.ndarray  # (N,) int32
    offsets: np.ndarray  # (n_examples + 1,) int64
    pass_seconds: float  # what the base's pass cost (0.0 when it was read from disk)
    pass_tokens: int  # tokens the base ran over (prompts included) in that pass
    from_disk: bool  # read from an earlier pass

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_targets(self) -> int:
        return int(self.offsets[-1])

    def rows(self, examples: Sequence[int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(hidden (n, D) float32, targets (n,) int64) of these examples, concatenated."""
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in examples]
        index = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        hidden = torch.from_numpy(np.ascontiguousarray(self.hidden[index])).to(device, torch.float32)
        return hidden, torch.from_numpy(self.targets[index].astype(np.int64)).to(device)

    def stats(self) -> dict[str, float | int | bool | None]:
        """The one-pass cost as a head's training block records it."""
        return {"examples": len(self), "target_tokens": self.n_targets, "pass_tokens": self.pass_tokens,
                "pass_seconds": round(self.pass_seconds, 2), "from_disk": self.from_disk,
                "pass_tokens_per_s": round(self.pass_tokens / self.pass_seconds, 1) if self.pass_seconds else None}


def cache_key(base: Base, encoded: Encoded) -> str:
    """Content key: the base's fingerprint, the format and every example's ids and prompt length."""
    digest = hashlib.sha256(f"{FORMAT}\0{base.fingerprint}\0{len(encoded)}".encode())
    for ids, prompt_len in encoded:
        digest.update(np.asarray([prompt_len, len(ids), *ids], dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute(base: Base, encoded: Encoded, desc: str = "base pass") -> TargetStates:
    """Run the base once over every example (length-sorted batches of ~PASS_TOKENS tokens, so padding stays small)."""
    n_embd = base.n_embd
    lengths = [len(ids) - 1 - (prompt_len - 1) for ids, prompt_len in encoded]  # positions prompt_len-1 .. len-2
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    hidden = np.zeros((int(offsets[-1]), n_embd), dtype=np.float16)
    targets = np.zeros(int(offsets[-1]), dtype=np.int32)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else (base.tokenizer.eos_token_id or 0)
    total = sum(len(ids) for ids, _ in encoded)
    started = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True)
    start = 0
    while start < len(order):
        batch = [order[start]]
        while start + len(batch) < len(order) and \
                (len(batch) + 1) * len(encoded[order[start + len(batch)]][0]) <= PASS_TOKENS:
            batch.append(order[start + len(batch)])
        start += len(batch)
        input_ids, mask, labels = collate([encoded[i] for i in batch], pad)
        out = base.hidden_states(input_ids.to(base.device), attention_mask=mask.to(base.device)).last_hidden_state
        scored = labels[:, 1:] != -100
        for row, i in enumerate(batch):
            rows = scored[row].nonzero().squeeze(-1)
            hidden[offsets[i]: offsets[i + 1]] = out[row, rows].float().cpu().numpy().astype(np.float16)
            targets[offsets[i]: offsets[i + 1]] = labels[row, rows + 1].numpy()
        bar.update(int(mask.sum()))
    bar.close()
    if not np.isfinite(hidden).all():
        raise ValueError("the base's hidden states overflow float16; this base cannot be cached in 16 bits")
    return TargetStates(hidden, targets, offsets, time.perf_counter() - started, total, from_disk=False)


def target_states(base: Base, encoded: Encoded, *, cache_dir: Path | None = None, use_disk: bool = True,
                  desc: str = "base pass") -> TargetStates:
    """The states of `encoded`, from an earlier pass on disk when one matches, else computed (and saved)."""
    if not use_disk:
        return compute(base, encoded, desc)
    folder = (cache_dir or default_cache_dir()).expanduser() / HIDDEN_DIR / cache_key(base, encoded)
    loaded = _load(folder, base.n_embd)
    if loaded is not None:
        log.info("%s: read %d target states from %s (no base pass)", desc, loaded.n_targets, folder)
        return loaded
    states = compute(base, encoded, desc)
    try:
        _save(states, folder)
    except OSError as e:  # a cache that cannot be written costs the next run a pass, nothing else
        log.warning("could not keep the hidden states in %s: %s", folder, e)
    return states


def _save(states: TargetStates, folder: Path) -> None:
    """Write to a sibling temporary folder, then rename: a crash never leaves a half pass that looks complete."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "hidden.npy", states.hidden)
    np.save(tmp / "targets.npy", states.targets)
    np.save(tmp / "offsets.npy", states.offsets)
    meta = {"format": FORMAT, "pass_seconds": states.pass_seconds, "pass_tokens": states.pass_tokens}
    (tmp / "meta.json").write_text(json.dumps(meta))
    sync_dir(tmp)
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process saved the same pass first
        if not folder.is_dir():
            raise


def _load(folder: Path, n_embd: int) -> TargetStates | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        hidden = np.load(folder / "hidden.npy", mmap_mode="r")
        targets = np.load(folder / "targets.npy")
        offsets = np.load(folder / "offsets.npy")
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or hidden.ndim != 2 or hidden.shape[1] != n_embd or \
            hidden.shape[0] != len(targets) or offsets[-1] != len(targets):
        log.warning("ignoring the unreadable hidden-state pass in %s", folder)
        return None
    return TargetStates(hidden, targets, offsets, float(meta.get("pass_seconds", 0.0)),
                        int(meta.get("pass_tokens", 0)), from_disk=True)


def chunked_cross_entropy(head: torch.nn.Module | None, hidden: Tensor, targets: Tensor, embeddings: Tensor, *,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS, backward: bool = False,
                          temperature: float = 1.0, denominator: float | None = None) -> tuple[float, int]:
    """(summed NLL in nats, rows) of `targets` under the head's logits, `chunk_rows` rows at a time.

    Memory is chunk_rows x V whatever the number of rows: with `backward=True` each chunk's share of the
    mean loss is back-propagated at once (gradients accumulate in the head's parameters), so no chunk's
    (rows, V) logits outlive it. `head=None` scores the base's own LM head (tied embeddings). `denominator`
    (default: these rows) is what the mean divides by: one rank of a multi-process fit holds only its share of
    a batch's rows, and divides by the whole batch's count (training/fit.py).
    """
    total, n = 0.0, hidden.shape[0]
    for start in range(0, n, chunk_rows):
        h, t = hidden[start: start + chunk_rows], targets[start: start + chunk_rows]
        logits = h @ embeddings.T.to(h.dtype) if head is None else head(h[None], embeddings)[0]  # (c, V)
        if temperature != 1.0:
            logits = logits / temperature
        loss = F.cross_entropy(logits.float(), t, reduction="sum")
        if backward:
            (loss / (denominator or n)).backward()
        total += float(loss.detach())
    return total, n
