"""Which keys a query may attend to: the one visibility rule that every attention path applies
(the PyTorch forward, FlexAttention's block mask, the fused decode step)."""

from __future__ import annotations

import torch


def visible_keys(
    key_pos: torch.Tensor, query_pos: torch.Tensor, query_seg: torch.Tensor, history: int | None
) -> torch.Tensor:
    """Which keys each query sees (shapes broadcast): a key is visible if it exists (position >= 0),
    is not in the future, lies in the query's document (which began ``query_seg`` tokens before
    the query) and, for local attention, at most ``history`` tokens back."""
    visible = (key_pos >= 0) & (key_pos <= query_pos) & (key_pos >= query_pos - query_seg)
    if history is not None:
        visible &= query_pos - key_pos <= history
    return visible
