"""Everything that wraps the single-device model for training, from outside, as torchtitan keeps
``parallelize`` apart from ``model``: device and precision, activation checkpointing, data
parallelism (PyTorch's DDP or FSDP2 under ``torchrun``), and gathering full state for checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from griffon.model import Griffon


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). ``auto`` avoids bf16 on CPUs without bf16 matmul
    instructions, where PyTorch falls back to scalar code (100x slower than fp32 on AVX2)."""
    if name == "fp32":
        return None
    if name == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for ``dtype`` (a no-op context for plain fp32)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def apply_activation_checkpointing(model: Griffon) -> None:
    """Recompute each residual block in the backward pass instead of storing its activations."""
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)


def parallelize(model: Griffon, mode: str, device: torch.device) -> nn.Module:
    """Wrap ``model`` for data parallelism: DDP, or FSDP2 sharding each residual block then the root
    (which replaces the parameters with sharded ones: build the optimizer after this)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def full_state_dicts(model: nn.Module, raw: Griffon, opt: torch.optim.Optimizer, mode: str) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state, gathered for saving (on every rank: FSDP2
    gathers collectively)."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return raw.state_dict(), opt.state_dict()


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, mode: str, state: dict[str, Any]) -> None:
    """Load a full optimizer state (as :func:`full_state_dicts` gave it) into a possibly sharded optimizer."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)
