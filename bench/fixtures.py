"""Benchmark fixtures: random bases (GPT-2-124M-shaped, SmolLM2-135M-shaped), a tokenizer, and random heads.

Why random weights: the benchmark measures cost, and cost is set by shapes (vocabulary, width,
layers), not by what the weights learned. Building everything locally keeps the benchmark offline.
The base is cached (it takes a while to initialise and write ~500 MB) and rebuilt when its spec
marker does not match what this code would write.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from heads import BackwardAttentionHead

EOS_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
BASE_SEED = 0
HEAD_SEED = 1
MARKER_NAME = "bench_fixture.json"
FIXTURE_VERSION = 1
DEFAULT_CACHE = Path(os.environ.get("HEADSERVE_BENCH_CACHE", Path.home() / ".cache" / "headserve-bench"))
# The math head's shape (registry/math/head_config.json): what a served head costs is set by these.
MATH_HEAD_CONFIG: dict[str, Any] = {"latent_dim": 64, "num_heads": 2, "weighting": "logits", "residual": True}

# Byte classes in the order their pairs are merged: English-ish text should merge into 2-byte tokens
# first, so prompts measured in tokens look roughly like real BPE prompts (about 2 characters a token).
_BYTE_PRIORITY = (b" etaoinshrdlcumwfgypbvkjxqz" + b"ETAOINSHRDLCUMWFGYPBVKJXQZ" + b"0123456789"
                  + b".,'\"?!:;-()\n")


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols (GPT-2's byte-to-printable-char map), indexed by byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _byte_order() -> list[int]:
    """All 256 byte values, the _BYTE_PRIORITY ones first, the rest by value."""
    first = list(dict.fromkeys(_BYTE_PRIORITY))
    return first + [b for b in range(256) if b not in set(first)]


def build_tokenizer(vocab_size: int = GPT2_VOCAB_SIZE) -> Any:
    """A byte-level BPE with exactly `vocab_size` ids: 256 bytes, deterministic pair merges, then EOS last.

    Why not a trained tokenizer: there is no corpus offline, and the benchmark only needs every id
    to exist and decode, with the GPT-2 layout (EOS = vocab_size - 1) so ids line up with the model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n_merges = vocab_size - 257
    if n_merges < 0 or n_merges > 256 * 256:
        raise ValueError(f"vocab_size must be between 257 and {257 + 256 * 256}, got {vocab_size}")
    symbols = byte_symbols()
    vocab = {sym: i for i, sym in enumerate(symbols)}
    order = _byte_order()
    merges: list[tuple[str, str]] = []
    # Pairs in order of (max rank, first rank, second rank): all pairs among the top-k bytes come
    # before any pair involving byte k+1, so the most common letters merge with each other first.
    for k in range(256):
        if len(merges) >= n_merges:
            break
        pairs = [(order[i], order[k]) for i in range(k)] + [(order[k], order[j]) for j in range(k + 1)]
        for a, b in pairs:
            if len(merges) >= n_merges:
                break
            merges.append((symbols[a], symbols[b]))
            vocab[symbols[a] + symbols[b]] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    if tok.get_vocab_size() != vocab_size or tok.token_to_id(EOS_TOKEN) != vocab_size - 1:
        raise RuntimeError(f"tokenizer came out with {tok.get_vocab_size()} ids, wanted {vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=1024)


def base_spec(n_layer: int = 12) -> dict[str, Any]:
    """What defines the cached base; a different spec means a different folder and a rebuild."""
    return {"version": FIXTURE_VERSION, "seed": BASE_SEED, "vocab_size": GPT2_VOCAB_SIZE, "n_embd": 768,
            "n_layer": n_layer, "n_head": 12, "n_positions": 1024, "tie_word_embeddings": True}


def base_dir_for(n_layer: int = 12, cache_dir: Path = DEFAULT_CACHE) -> Path:
    name = "gpt2-124m-random" if n_layer == 12 else f"gpt2-{n_layer}layer-random"
    return Path(cache_dir) / name


def _is_valid_base(folder: Path, spec: dict[str, Any]) -> bool:
    marker = folder / MARKER_NAME
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return recorded == spec and all((folder / f).is_file() for f in needed)


def _build_cached(folder: Path, spec: dict[str, Any], model: Callable[[], Any], log: Any, what: str) -> Path:
    """`folder` holding `model()` (random weights, seeded by the spec) and the bench tokenizer, unless it
    already holds this spec; built atomically: a temporary sibling, then one rename."""
    if _is_valid_base(folder, spec):
        return folder
    log(f"building the random {what} at {folder} (once; it is cached)")
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.manual_seed(spec["seed"])
        model().save_pretrained(tmp, safe_serialization=True)
        build_tokenizer(spec["vocab_size"]).save_pretrained(tmp)
        (tmp / MARKER_NAME).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_base(n_layer: int = 12, cache_dir: Path = DEFAULT_CACHE, log: Any = print) -> Path:
    """The cached random base folder, built (atomically: tmp folder, then rename) when missing or stale."""
    from transformers import GPT2Config, GPT2LMHeadModel

    spec = base_spec(n_layer)

    def model() -> Any:
        eos = spec["vocab_size"] - 1
        config = GPT2Config(vocab_size=spec["vocab_size"], n_positions=spec["n_positions"], n_embd=spec["n_embd"],
                            n_layer=n_layer, n_head=spec["n_head"], bos_token_id=eos, eos_token_id=eos,
                            pad_token_id=eos, tie_word_embeddings=True)
        return GPT2LMHeadModel(config)

    return _build_cached(base_dir_for(n_layer, cache_dir), spec, model, log, "base")


def smollm2_spec(n_layer: int = 30) -> dict[str, Any]:
    """SmolLM2-135M's exact shape (Llama: GQA 9/3 heads, SwiGLU, RoPE theta 1e5, tied embeddings), random weights.

    What defines the cached folder; tests shrink it by overriding the sizes, never the kind.
    """
    return {"version": FIXTURE_VERSION, "kind": "smollm2-shaped", "seed": BASE_SEED, "vocab_size": 49152,
            "hidden_size": 576, "n_layer": n_layer, "num_attention_heads": 9, "num_key_value_heads": 3,
            "intermediate_size": 1536, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
            "tie_word_embeddings": True}


def smollm2_dir_for(n_layer: int = 30, cache_dir: Path = DEFAULT_CACHE) -> Path:
    name = "smollm2-135m-shaped-random" if n_layer == 30 else f"smollm2-shaped-{n_layer}layer-random"
    return Path(cache_dir) / name


def ensure_smollm2_base(n_layer: int = 30, cache_dir: Path = DEFAULT_CACHE, log: Any = print, *,
                        spec: dict[str, Any] | None = None, folder: Path | None = None) -> Path:
    """The cached random SmolLM2-shaped base, built like `ensure_base` (atomically, once per spec)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or smollm2_spec(n_layer)

    def model() -> Any:
        eos = spec["vocab_size"] - 1  # build_tokenizer's layout: EOS is the last id
        heads = spec["num_attention_heads"]
        config = LlamaConfig(
            vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], num_hidden_layers=spec["n_layer"],
            num_attention_heads=heads, num_key_value_heads=spec["num_key_value_heads"],
            head_dim=spec["hidden_size"] // heads, intermediate_size=spec["intermediate_size"],
            rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
            rms_norm_eps=spec["rms_norm_eps"], max_position_embeddings=spec["max_position_embeddings"],
            tie_word_embeddings=spec["tie_word_embeddings"], bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        return LlamaForCausalLM(config)

    return _build_cached(folder or smollm2_dir_for(spec["n_layer"], cache_dir), spec, model, log,
                         "SmolLM2-shaped base")


def make_head(vocab_size: int, n_embd: int, seed: int = HEAD_SEED) -> BackwardAttentionHead:
    """A math-shaped backward-attention head with a small random query (not the identity-with-base start)."""
    from heads import BackwardAttentionConfig, BackwardAttentionHead

    torch.manual_seed(seed)
    head = BackwardAttentionHead(BackwardAttentionConfig(**MATH_HEAD_CONFIG), vocab_size=vocab_size, n_embd=n_embd)
    with torch.no_grad():
        # The residual init zeros W_Q, which would make the head the base plus zeros; the cost is the
        # same either way, but a head that actually changes the logits is the honest thing to time.
        head.query.weight.normal_(std=0.02)
    head.eval()
    return head


def write_heads(heads_dir: Path, base_info: dict[str, str], vocab_size: int, n_embd: int,
                names: list[str]) -> Path:
    """Save one random head and copy its folder under every name; returns the template folder.

    Copies share weights, which is fine: the server loads and prepares each name separately.
    The template is written outside `heads_dir` so tests can copy it in later as a "fresh" head.
    """
    from heads import save_head

    heads_dir.mkdir(parents=True, exist_ok=True)
    template = heads_dir.parent / "head-template"
    save_head(make_head(vocab_size, n_embd), template, base_info, task="bench")
    for name in names:
        dest = heads_dir / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(template, dest)
    return template


def copy_head(template: Path, heads_dir: Path, name: str) -> Path:
    """Copy a head folder in by hand, as an operator would; the server sees it without a restart."""
    tmp = heads_dir / f".{name}.tmp"
    shutil.copytree(template, tmp)
    dest = heads_dir / name
    tmp.rename(dest)
    return dest


def _storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def resident_head_tensors(head: nn.Module, shared: Tensor | None = None) -> dict[str, int]:
    """Bytes per tensor a prepared head keeps alive: parameters, buffers and tensor attributes (prepare's caches).

    Tensors that share storage with `shared` (the base's embedding matrix, which every head merely
    references) are not the head's cost and are skipped; each storage is counted once, under the
    first name it is found by (a prepared residual head keeps a reference to the base's embeddings).
    """
    skip = {_storage_ptr(shared)} if shared is not None else set()
    seen: set[int] = set()
    sizes: dict[str, int] = {}
    named: list[tuple[str, Tensor]] = [*head.named_parameters(remove_duplicate=False),
                                       *head.named_buffers(remove_duplicate=False)]
    for prefix, module in head.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                named.append((f"{prefix}.{attr}" if prefix else attr, value))
    for name, t in named:
        ptr = _storage_ptr(t)
        if ptr in skip or ptr in seen:
            continue
        seen.add(ptr)
        sizes[name] = t.untyped_storage().nbytes()
    return sizes


def resident_head_bytes(head: nn.Module, shared: Tensor | None = None) -> int:
    """Total of `resident_head_tensors`: what one more resident head costs in device memory."""
    return sum(resident_head_tensors(head, shared).values())
