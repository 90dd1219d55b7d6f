"""Next-token losses: cross-entropy and the Goldfish loss."""

from __future__ import annotations

import torch
from torch.nn import functional as F

# A fixed odd multiplier for the rolling hash (any large odd 63-bit constant works).
_HASH_MUL = 0x5851F42D4C957F2D & ((1 << 62) - 1)


def goldfish_mask(inputs: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """(B, T) bool, True for targets kept in the loss.

    Goldfish loss (Hans et al. 2024): drop about 1/k of the targets, chosen by hashing the ``h``
    tokens before each target, so a passage seen twice drops the same tokens and cannot be
    memorised verbatim. Targets with fewer than ``h`` tokens of context are kept.
    """
    B, T = inputs.shape
    if T < h:
        return torch.ones(B, T, dtype=torch.bool, device=inputs.device)
    windows = inputs.long().unfold(1, h, 1)  # (B, T - h + 1, h): window j ends at input j + h - 1
    hashed = torch.zeros(windows.shape[:2], dtype=torch.long, device=inputs.device)
    for i in range(h):  # polynomial rolling hash, wrapping in int64
        hashed = hashed * _HASH_MUL + windows[..., i] + 1
    keep_tail = (hashed % k) != 0
    # target t is predicted from inputs[.., :t+1]; its context window ends at input t
    return torch.cat([torch.ones(B, h - 1, dtype=torch.bool, device=inputs.device), keep_tail], dim=1)


def next_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over kept targets (float32), and the number of targets kept."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        return losses.mean(), torch.tensor(losses.numel())
    keep = mask.flatten()
    n = keep.sum()
    return (losses * keep).sum() / n.clamp_min(1), n
