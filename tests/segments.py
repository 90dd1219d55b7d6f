"""Helpers for tests: segment positions of packed documents."""

import torch


def doc_positions(T: int, starts: list[int]) -> torch.Tensor:
    """(T,) segment_pos of a row whose documents start at 0 and at ``starts``."""
    pos, p = [], 0
    for t in range(T):
        p = 0 if t == 0 or t in starts else p + 1
        pos.append(p)
    return torch.tensor(pos)


def doc_ids(seg: torch.Tensor) -> torch.Tensor:
    """Which document each token belongs to, from segment_pos (..., T)."""
    return (seg == 0).cumsum(-1)


# Three rows of 23 tokens: documents starting mid-row, none, and several short ones.
SEG = torch.stack([doc_positions(23, [9]), doc_positions(23, []), doc_positions(23, [1, 2, 15])])  # (3, 23)
