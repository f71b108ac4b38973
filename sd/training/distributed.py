"""Training on several processes: the same `sd train` under `torchrun`, on PyTorch's DistributedDataParallel.

No tutorial counterpart. References: PyTorch's torch.distributed and DistributedDataParallel (DDP) documentation,
and `torchrun` (torch.distributed.run), which starts the processes and gives each RANK, WORLD_SIZE, LOCAL_RANK.

How a step is shared out (sd.training.train._gradients): every process draws the step's randomness for the whole
effective batch (batch_size x world size x grad_accum samples) from the same (seed, step) generator, and keeps
only its own samples, reading only their images. DDP all-reduces the gradients to their mean over every process,
so K steps on N processes give the weights of K steps on one process with N times the batch and the same data.
Rank 0 alone writes checkpoints, samples, logs and the final file; every rank reads a checkpoint it resumes from,
so the folder must be shared by the machines of a multi-node run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checks import check

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank 0 of 1 when not started by torchrun."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints progress."""
        return self.rank == 0

    def positions(self, batch_size: int, grad_accum: int) -> list[int]:
        """The positions, in a step's effective batch of batch_size x size x grad_accum samples, that this rank
        computes: for each micro-batch i, its own batch_size samples of the i-th block of batch_size x size, which
        is the i-th micro-batch of one process with batch_size x size."""
        block = batch_size * self.size
        return [i * block + self.rank * batch_size + j for i in range(grad_accum) for j in range(batch_size)]


SINGLE = World()


def _env_int(name: str) -> int:
    value = os.environ[name]
    check(value.isdigit(), f"the environment variable {name} must be a whole number >= 0 (torchrun sets it), "
          f"got {value!r}")
    return int(value)


def world_from_env() -> World:
    """The World torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; SINGLE when WORLD_SIZE is not set."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    check(not missing, f"WORLD_SIZE is set but {', '.join(missing)} is not: start several processes with "
          f"torchrun --nproc_per_node=N (it sets all of {', '.join(TORCHRUN_VARIABLES)})")
    world = World(_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK"))
    check(world.size >= 1 and world.rank < world.size,
          f"RANK {world.rank} must be below WORLD_SIZE {world.size} (torchrun sets both)")
    return world


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_device(world: World, device: str) -> str:
    """Each process of a multi-GPU run takes the GPU of its LOCAL_RANK; a CPU (or a given cuda:N) stays as it is."""
    if world.size > 1 and device == "cuda":
        check(world.local_rank < torch.cuda.device_count(), f"LOCAL_RANK {world.local_rank} has no GPU: this "
              f"machine has {torch.cuda.device_count()}; give torchrun --nproc_per_node at most that")
        return f"cuda:{world.local_rank}"
    return device


@contextlib.contextmanager
def process_group(world: World, device: str) -> Iterator[None]:
    """The process group of a torchrun run (nothing for a single process), torn down on the way out."""
    if world.size == 1 or dist.is_initialized():
        yield
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device))
    try:
        yield
    finally:
        dist.destroy_process_group()


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    """A number's mean over every rank (each rank's step loss -> the step's loss); the value itself for one."""
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / world.size
