"""Distributed training setup for ``wam_fast.distill.trainer``: ranks, process group, DDP / FSDP2.

Under ``torchrun`` (RANK / WORLD_SIZE set) ``setup_distributed`` initialises the process group if it
is not (gloo on CPU, nccl on CUDA); ``forwarding_ddp`` wraps a model in DDP, ``fully_shard`` shards
it with FSDP2, and ``full_state_dict`` / ``full_options`` gather full (unsharded) state dicts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn


@dataclass
class Dist:
    """The process's place in a run: mode (none | ddp | fsdp), rank, world size, device."""

    mode: str  # none | ddp | fsdp
    rank: int
    world: int
    device: torch.device
    created_group: bool

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def barrier(self):
        if self.active:
            torch.distributed.barrier()

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def default_device() -> torch.device:
    """This process's device when none is given: ``cuda:LOCAL_RANK`` (LOCAL_RANK 0 outside torchrun)
    when CUDA is available, else cpu. A LOCAL_RANK without a GPU of its own (2 processes on a 1-GPU
    machine) is a ValueError, not a request for a device that does not exist."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    _check_cuda_index(device)
    return device


def _check_cuda_index(device: torch.device) -> None:
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{device} does not exist: this machine has {count} visible CUDA device(s) "
                         f"(LOCAL_RANK={os.environ.get('LOCAL_RANK', 'unset')}); start at most {count} process(es) "
                         f"per node (torchrun --nproc_per_node {count}), choose the device explicitly, or run on "
                         "CPU (CUDA_VISIBLE_DEVICES='')")


def setup_distributed(parallel: str, device_name: Optional[str]) -> Dist:
    """The ``Dist`` of ``TrainConfig.parallel`` / ``TrainConfig.device`` in this process's environment."""
    import torch.distributed as dist

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else (int(os.environ["WORLD_SIZE"]) if launched else 1)
    mode = parallel
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise ValueError(f"parallel='none' with {world} processes would train {world} independent copies; "
                         "use parallel='ddp' or 'fsdp' (or 'auto') under torchrun")
    if mode != "none" and not (initialised or launched):
        raise ValueError(f"parallel={mode!r} needs torchrun (RANK and WORLD_SIZE in the environment) or an "
                         "initialised torch.distributed process group; use parallel='none' or 'auto' "
                         "for one process")
    device = default_device() if device_name is None else torch.device(device_name)
    if device.type == "cuda":
        _check_cuda_index(device)
        torch.cuda.set_device(device)
    created = False
    if mode != "none" and not initialised:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    rank = dist.get_rank() if mode != "none" else 0
    world = dist.get_world_size() if mode != "none" else 1
    return Dist(mode, rank, world, device, created)


def forwarding_ddp():
    """The class ``ForwardingDDP``: DDP that forwards missing attributes to the model."""
    from torch.nn.parallel import DistributedDataParallel

    class ForwardingDDP(DistributedDataParallel):
        """DDP whose missing attributes (``config``, ``noisy_video_shape``, ...) come from the model,
        so an objective can treat the student like the model itself."""

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                module = self.__dict__.get("_modules", {}).get("module")
                if module is None or name == "module":
                    raise
                return getattr(module, name)

    return ForwardingDDP


def fully_shard(module: nn.Module, device: torch.device) -> None:
    """FSDP2 ``fully_shard`` on each of ``module.blocks``, then on ``module`` (once), over all ranks on
    ``device``'s type (FSDP2's default mesh is CUDA whenever a GPU exists, even for a run on the CPU)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard as shard

    if isinstance(module, FSDPModule):  # e.g. a teacher already sharded by an earlier run
        return
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        for block in blocks:
            shard(block, mesh=mesh)
    shard(module, mesh=mesh)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def full_options(**kw):
    """``StateDictOptions`` for full (gathered) state dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The full state dict of a (possibly sharded) module, on the CPU; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=full_options(cpu_offload=True))
