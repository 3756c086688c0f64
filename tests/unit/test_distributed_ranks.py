"""The sharding rule: every global batch is split among the ranks without loss or overlap, by rows of each shard."""

from __future__ import annotations

import random

import pytest

from training.distributed import TORCHRUN_ENV, DistributedSetupError, Ranks, from_env


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_rank_trains_on_its_own_rows_of_every_batch(world) -> None:
    examples = [f"example {i}" for i in range(23)]
    ranks = [Ranks(rank=r, world=world, backend="gloo") for r in range(world)]
    shards = [r.shard(examples) for r in ranks]
    assert sorted(sum(shards, [])) == sorted(examples)  # every example in exactly one shard
    perm = list(range(len(examples)))
    random.Random(0).shuffle(perm)
    for start in range(0, len(perm), 5):
        batch = perm[start: start + 5]
        taken = [shards[r.rank][row] for r in ranks for row in r.local(batch)]
        assert sorted(taken) == sorted(examples[i] for i in batch)


def test_one_process_without_torchrun_joins_no_group(monkeypatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    ranks = from_env("cpu")
    assert ranks == Ranks() and ranks.main and ranks.sum(1.5, 2) == [1.5, 2] and ranks.gather("x") == ["x"]
    assert ranks.local([3, 1, 2]) == [3, 1, 2]


def test_an_incomplete_torchrun_environment_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE, LOCAL_RANK missing"):
        from_env("cpu")
