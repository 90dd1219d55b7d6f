"""Packed documents in two conventions: ``segment_pos`` (position inside the document, 0 at each
start) and flash-attention's ``cu_seqlens`` ((N+1,) offsets of N documents in one flat stream)."""

from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """Raise ValueError unless ``cu_seqlens`` is (N+1,) strictly increasing offsets from 0 to ``total``."""
    cu = cu_seqlens
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens must be (N+1,) offsets from 0 to the stream length {total}")
    if bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError("cu_seqlens must be strictly increasing (no empty sequences)")


def segment_pos_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, total) int64 position of each token inside its sequence, for sequences at ``cu_seqlens``."""
    check_cu_seqlens(cu_seqlens, total)
    cu = cu_seqlens.to(torch.long)
    steps = torch.arange(total, device=cu.device)
    sequence = torch.searchsorted(cu[1:], steps, right=True)  # (total,) which sequence each token is in
    return (steps - cu[sequence])[None]


def cu_seqlens_from_segment_pos(segment_pos: torch.Tensor) -> torch.Tensor:
    """(N+1,) int32 offsets of the document pieces of a (B, T) batch read as one (1, B*T) stream:
    every document start and every row start begins a sequence."""
    B, T = segment_pos.shape
    starts = segment_pos == 0
    starts[:, 0] = True
    offsets = starts.flatten().nonzero().flatten()
    return torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int32)


def varlen_batch(tokens: torch.Tensor, segment_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loader batch (B, T+1) of tokens and segment_pos as unpadded packed sequences:
    ``(inputs (1, B*T), targets (1, B*T), cu_seqlens (N+1,))`` for ``model(inputs, cu_seqlens=...)``."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return inputs.reshape(1, -1), targets.reshape(1, -1), cu_seqlens_from_segment_pos(segment_pos[:, :-1])
