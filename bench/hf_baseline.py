"""The baseline a user would write without headserve: a loop over Hugging Face `model.generate`.

Why in-process and one request at a time: that is the plain way to serve a model with HF and the
fairest "no server" reference. HF cannot apply our heads, so every request decodes with the base's
linear LM head; greedy, with min_new_tokens = max_new_tokens so each request makes exactly N tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.stats import throughput

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def hf_generate_loop(base_dir: Path, prompts: Sequence[str], max_new_tokens: int, *, device: str = "cpu",
                     dtype: str = "float32") -> dict[str, Any]:
    """Generate N tokens for each prompt in turn; returns tokens, wall time and tokens/s (after one warm-up)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[dtype])
    # Called through nn.Module's type: mypy misreads PreTrainedModel.to, wrapped by functools.wraps (python/mypy#17166).
    module: torch.nn.Module = model
    module.to(device).eval()
    pad = tokenizer.eos_token_id

    def one(prompt: str) -> int:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        return int(out.shape[1] - enc["input_ids"].shape[1])

    one(prompts[0])  # warm-up: first-call costs are not what the loop measures
    _sync(device)
    latencies, tokens = [], 0
    start = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        tokens += one(prompt)
        _sync(device)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {"requests": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": throughput(tokens, wall),
            "latencies_s": latencies}
