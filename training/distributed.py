"""What one process of `torchrun --nproc_per_node N -m training.fit` needs to know and do about the others.

Why a module of its own: the fit loop stays the one-process loop, and everything that is about ranks (which
examples a rank owns, the collectives, gradients summed by DDP) has one owner here. A process started without
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) gets `ONE_PROCESS`: no process group, no collective, the
same numbers as before multi-process training existed.

The sharding rule, which everything else follows: example i (an index into the training rows after the seeded
shuffle and held-out split) belongs to rank `i % world`, and is row `i // world` of that rank's hidden-state
shard. Every rank draws the same permutation from the seed, so a global batch holds exactly the examples one
process would put in it; each rank runs the part of it that it owns.
"""

# No `from __future__ import annotations` here: DDP checks a comm hook's annotations as objects, not strings.
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)
T = TypeVar("T")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets in every process it starts


class DistributedSetupError(ValueError):
    """torchrun's environment is incomplete or asks for what this machine cannot do (nccl without a GPU)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; the defaults are one process, no group."""

    rank: int = 0  # which process this is
    world: int = 1  # how many processes train the head
    backend: str | None = None  # "gloo" (CPU) or "nccl" (GPU); None: no process group
    device: str = "cpu"  # where the base, the head and the collectives' tensors live for this rank

    @property
    def main(self) -> bool:
        """Rank 0 writes the head and prints; the others only compute."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """The items this rank owns: i % world == rank, in order (so item i is row i // world of the shard)."""
        return list(items[self.rank::self.world])

    def local(self, examples: Sequence[int]) -> list[int]:
        """This rank's part of a global batch, as rows of its shard."""
        return [i // self.world for i in examples if i % self.world == self.rank]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, so counts and summed losses stay exact enough)."""
        if self.backend is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (small, picklable things: per-rank statistics)."""
        if self.backend is None:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, head: nn.Module) -> nn.Module:
        """The module whose backward sums gradients over the ranks: `head` itself for one process, else DDP.

        DDP averages gradients by default; each rank's loss is already divided by the whole batch's target
        count, so the hook below sums them instead: the one-process gradient, whatever the split. The
        parameters are broadcast from rank 0 when DDP wraps them, so every rank starts from one head.
        """
        if self.backend is None:
            return head
        device_ids = [torch.device(self.device).index] if self.backend == "nccl" else None
        # Heads keep no buffers, so DDP's forward runs no collective of its own (it would sync buffers on every
        # forward): ranks may run as many chunks per step as their share of a batch holds, not the same number.
        model = DistributedDataParallel(head, device_ids=device_ids)
        model.register_comm_hook(None, _sum_gradients)
        return model

    def barrier(self) -> None:
        if self.backend is not None:
            dist.barrier()

    def close(self) -> None:
        if self.backend is not None and dist.is_initialized():
            dist.destroy_process_group()


ONE_PROCESS = Ranks()


def _sum_gradients(_state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def from_env(device: str) -> Ranks:
    """This process's ranks, with the process group joined when torchrun started it; else `ONE_PROCESS` on `device`.

    Under torchrun a CUDA device means this rank's own GPU, `cuda:LOCAL_RANK`, with nccl; anything else is gloo.
    """
    present = [name for name in TORCHRUN_ENV if name in os.environ]
    if not present:
        return Ranks(device=device)
    if len(present) != len(TORCHRUN_ENV):
        raise DistributedSetupError(f"torchrun's environment is incomplete: {', '.join(present)} set, "
                                    f"{', '.join(n for n in TORCHRUN_ENV if n not in present)} missing")
    rank, world, local_rank = (int(os.environ[name]) for name in TORCHRUN_ENV)
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(f"--device {device} under torchrun needs GPU {local_rank} for local rank "
                                        f"{local_rank}; {torch.cuda.device_count()} visible")
        device, backend = f"cuda:{local_rank}", "nccl"
        torch.cuda.set_device(device)
    elif torch.device(device).type == "cpu":
        backend = "gloo"
    else:
        raise DistributedSetupError(f"--device {device}: multi-process training runs on cpu (gloo) or cuda (nccl)")
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    log.info("rank %d of %d (%s on %s)", rank, world, backend, device)
    return Ranks(rank=rank, world=world, backend=backend, device=device)
