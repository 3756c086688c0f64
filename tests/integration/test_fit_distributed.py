"""`torchrun --nproc_per_node 2 -m training.fit` trains the head one process trains, and writes it once.

Real torchrun (torch.distributed.run, --standalone picks a free port), two gloo processes on the tiny base.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heads import load_head
from training import fit
from training.distributed import TORCHRUN_ENV

ROOT = Path(__file__).resolve().parents[2]
# Batch 3 over 2 ranks: some batches hold none of one rank's examples (the empty-share path, checked below);
# 16-row chunks: every rank runs several chunks per step, all but the last under DDP's no_sync().
ARGS = ("--task", "math", "--epochs", "2", "--batch-size", "3", "--chunk-rows", "16", "--eval-every", "5",
        "--max-steps", "30", "--seed", "0")
pytestmark = pytest.mark.slow  # two torchrun launches: about 20 s each on 2 busy cores


def torchrun(base: Path, data: Path, out: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", HEADSERVE_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.fit", "--base", str(base), "--data", str(data), "--out", str(out), *ARGS]
    # A bound instead of a hang: a rank left waiting on a dead peer would otherwise never return.
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def an_empty_share_happened(examples: int, steps: int, batch_size: int) -> bool:
    """Whether some global batch of these steps holds only one rank's examples (fit's permutation, seed 0)."""
    order, batches = torch.Generator().manual_seed(0), []
    while len(batches) < steps:
        perm = torch.randperm(examples, generator=order).tolist()
        batches += [perm[s: s + batch_size] for s in range(0, examples, batch_size)]
    return any(len({i % 2 for i in b}) == 1 for b in batches[:steps])


def test_two_processes_train_the_head_one_process_trains(tiny_base_dir, synth_dir, tmp_path, monkeypatch) -> None:
    two = torchrun(tiny_base_dir, synth_dir, tmp_path / "heads" / "two", tmp_path / "cache2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1 and "on 2 processes (gloo)" in two.stdout  # rank 0 alone prints
    assert [p.name for p in (tmp_path / "heads").iterdir()] == ["two"]  # one head folder, no temporary left
    # Each rank ran the base over its own shard and cached it under its own key: train and held-out, per rank.
    assert len(list((tmp_path / "cache2" / "hidden").iterdir())) == 4

    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HEADSERVE_CACHE_DIR", str(tmp_path / "cache1"))
    fit.main(["--base", str(tiny_base_dir), "--data", str(synth_dir), "--out", str(tmp_path / "one"), *ARGS])

    one_head, one_meta = load_head(tmp_path / "one")
    two_head, two_meta = load_head(tmp_path / "heads" / "two")
    # The same global batches, gradients summed instead of accumulated in one process: equal up to float32
    # summation order (and float16 states computed in other batches), about 3e-7 here after 30 steps.
    for (name, p), q in zip(one_head.state_dict().items(), two_head.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
    one, two_t = one_meta.training, two_meta.training
    for key in ("train_loss", "held_out_loss", "base_held_out_loss"):
        assert two_t["final_metrics"][key] == pytest.approx(one["final_metrics"][key], abs=2e-4), key
    assert two_t["steps"] == one["steps"] == 30 and two_t["target_tokens"] == one["target_tokens"]
    assert one["processes"] == {"world_size": 1, "backend": None, "examples_per_rank": [one["examples"]],
                                "pass_seconds_per_rank": one["processes"]["pass_seconds_per_rank"]}
    p = two_t["processes"]
    assert p["world_size"] == 2 and p["backend"] == "gloo"
    assert sorted(p["examples_per_rank"]) == [30, 31] and sum(p["examples_per_rank"]) == one["examples"]
    assert len(p["pass_seconds_per_rank"]) == 2 and min(p["pass_seconds_per_rank"]) > 0
    assert two_t["hidden_pass"]["target_tokens"] == one["hidden_pass"]["target_tokens"]
    assert an_empty_share_happened(one["examples"], 30, 3)


def test_a_rank_that_fails_fails_the_run(tiny_base_dir, synth_dir, tmp_path) -> None:
    """Rank 0 cannot write the head (its parent is a file) while rank 1 waits at the barrier: torchrun stops
    both and exits nonzero, instead of leaving rank 1 waiting."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    run = torchrun(tiny_base_dir, synth_dir, blocker / "head", tmp_path / "cache")
    assert run.returncode != 0
    assert "error: [rank 0]" in run.stderr and "error: [rank 1]" not in run.stderr
    assert blocker.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "not-a-folder"]  # no head, no temporary
