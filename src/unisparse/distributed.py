"""Several processes under ``torchrun``: FSDP2 sharding and the global batch split across ranks.

With one process in fp32 (no ``torchrun``, or ``--nproc-per-node 1``) nothing here does anything:
the training loop runs on the model it was given. With ``WORLD_SIZE > 1``, or a bf16 model whose
trainable parameters keep fp32 master weights, the loop trains a model sharded with FSDP2 over the
units its family names (``sharding``): built from the files by the CLI (no rank holds the whole
model), or a twin of a model in memory (library use) whose trained weights are copied back.
Every rank draws the whole global batch from the same seeded generators and keeps its slice, so a
run on N processes sees exactly the samples, noise and dropout of a run on one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def slice(self, batch: int) -> slice:
        """This rank's contiguous share of a global batch (which the world size must divide)."""
        if batch % self.size:
            raise ValueError(f"the global batch {batch} is not divisible by the {self.size} processes")
        share = batch // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()


def world(device=None) -> World:
    """The process group of this run, initialised from torchrun's environment (gloo on CPU, nccl on
    CUDA); a single process needs none."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (the host memory a job's limit counts):
    Linux's ``VmHWM``, which starts afresh at exec (``ru_maxrss`` would carry over the peak of the
    process that started this one), else ``ru_maxrss``."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def rank_device(device, w: World):
    """Under torchrun each rank takes the CUDA device of its local rank."""
    device = torch.device(device)
    if w.sharded and device.type == "cuda":
        return torch.device("cuda", w.local_rank)
    return device


def single_process_group(device) -> None:
    """A process group of one (no torchrun): what FSDP2 needs to keep fp32 master weights of a
    bf16 model in a single process, exactly as a sharded run does."""
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors) already."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a possibly sharded one (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like`` (this rank's shard of it when ``like`` is sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full.to(like.device, like.dtype)


def copy_back(twin, model, w: World) -> None:
    """Gather the twin's trained weights and load them into ``model`` on every rank."""
    state = {name: full_tensor(t).detach().cpu() for name, t in twin.state_dict().items()}
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    w.barrier()
