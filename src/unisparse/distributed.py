"""Several processes under ``torchrun``: FSDP2 sharding and the global batch split across ranks.

With one process (no ``torchrun``, or ``--nproc-per-node 1``) nothing here does anything: the
training loop runs on the model it was given. With ``WORLD_SIZE > 1`` the loop trains a sharded
twin of the model (``fully_shard`` per decoder layer, then the root) built on the meta device and
filled from the model's weights, and copies the trained weights back at the end, so callers keep
working with an ordinary model and checkpoints stay ordinary files (gathered on rank 0).
Every rank draws the whole global batch from the same seeded generators and keeps its slice, so a
run on N processes sees exactly the samples, noise and dropout of a run on one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: model methods that run a forward pass without calling ``forward`` (FSDP2 must unshard for them)
FORWARD_METHODS = ("flow_loss", "velocity_at", "understanding_logits", "generate_images")


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


def rank_device(device, w: World):
    """Under torchrun each rank takes the CUDA device of its local rank."""
    device = torch.device(device)
    if w.sharded and device.type == "cuda":
        return torch.device("cuda", w.local_rank)
    return device


def sharded_twin(model, trainable: set[str], device):
    """A copy of ``model`` sharded with FSDP2 over the process group, holding its weights (the MoT
    family: its decoder layers are the units sharded)."""
    if not hasattr(model, "layers") or not hasattr(model, "config"):
        raise ValueError(
            f"sharded training under torchrun supports the MoT family only, not {type(model).__name__}: "
            "run this family's tuning as one process"
        )
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    with torch.device("meta"):
        twin = type(model)(model.config).to(model.dtype)
    for layer in twin.layers:
        fully_shard(layer)
    fully_shard(twin)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(twin, name)
    twin.to_empty(device=device)
    set_model_state_dict(twin, model.state_dict(), options=StateDictOptions(full_state_dict=True))
    for name, p in twin.named_parameters():
        p.requires_grad_(name in trainable)
    return twin


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
