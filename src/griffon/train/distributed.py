"""The process group of multi-process training under ``torchrun`` and the few collectives the
trainer calls itself (the wrapping, DDP or FSDP2, is in :mod:`griffon.train.parallelize`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(mode: str, device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (``RANK``/``WORLD_SIZE`` in the environment)."""
    if mode == "none":
        return DistInfo()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(f"distributed={mode!r} needs torchrun (RANK and WORLD_SIZE are not set)")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_reduce_grads_(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters that no DDP wrapper reduces (the self-guided guides)."""
    if dist.is_initialized():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (so that all ranks stop at the same step)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
