"""AdamW parameter groups, learning-rate schedules and adaptive gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

from griffon.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, scope: str = "matrices") -> list[dict]:
    """Decay matrices only: norms' scales, biases, embeddings and the RG-LRU ``a_param`` are exempt
    (decaying ``a_param`` would pull every decay rate towards one value). With ``scope="all"``
    every parameter decays, as in the StructuredFFN papers' code."""
    if scope == "all":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or name.endswith(".bias") or "embed" in name or name.endswith("a_param")
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = cfg.warmup_steps if cfg.warmup_fraction is None else int(cfg.warmup_fraction * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: stable at the peak, then linear decay over the last decay_fraction of the steps
    decay_start = total_steps - int(cfg.decay_fraction * total_steps)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return cfg.lr + (floor - cfg.lr) * progress


@torch.no_grad()
def adaptive_grad_clip(model: nn.Module, clip: float, eps: float = 1e-3) -> None:
    """AGC (Brock et al. 2021): rescale each output unit's gradient so that
    ``||G_i|| / max(||W_i||, eps) <= clip``. Norms are taken over all but the first dimension.
    Like the paper, the output head is left unclipped; with tied embeddings that is the
    embedding, so it is skipped, as are 1-D parameters (norm scales, biases)."""
    for name, p in model.named_parameters():
        if p.grad is None or p.dim() < 2 or "embed" in name:
            continue
        dims = tuple(range(1, p.dim()))
        w_norm = p.detach().norm(dim=dims, keepdim=True).clamp_min(eps)
        g_norm = p.grad.norm(dim=dims, keepdim=True)
        max_norm = clip * w_norm
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
        p.grad.mul_(scale)
