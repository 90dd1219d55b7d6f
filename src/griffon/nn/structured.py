"""Structured linear layers for the feed-forward network (Wei et al. 2024, arXiv 2406.16450).

Each layer maps ``in_features -> out_features`` like ``nn.Linear`` but with fewer parameters:

- :class:`LowRankLinear`: ``y = (x V^T) U^T``; V (rank, in), U (out, rank).
- :class:`BlockShuffleLinear`: two block-diagonal factors with a shuffle between them and after
  (Monarch-style); dense equivalent ``W = P_out BD(w2) P_mid BD(w1)``.
- :class:`BlockDenseLinear`: a block-diagonal factor (in -> rank) then a dense ``rank -> out``.

All three run as plain and batched matmuls (no block-diagonal matrix is ever materialised on the
fast path), expose ``to_dense()`` (their exact dense equivalent, built from the factors), and
pre-merge for decoding: with autograd off and at most ``merge_threshold`` tokens in a call, they
multiply by the cached dense weight instead. Whether that is faster depends on the machine: one
matmul instead of two (or of two batched matmuls and a shuffle) saves fixed per-call costs, but
reads more weight bytes. :func:`calibrate_merge_thresholds` measures the crossover per layer shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from griffon.config import LinearStructure


class StructuredLinear(nn.Module):
    """Common part of the structured layers: bias, initialisation scale, pre-merged decoding."""

    def __init__(self, in_features: int, out_features: int, bias: bool, merge_threshold: int | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.merge_threshold = merge_threshold
        self._merged: torch.Tensor | None = None
        self._merged_key: tuple = ()

    def factors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The (out, in) matrix W with ``layer(x) == x @ W.T + bias``."""
        return self._dense_from(self.factors())

    def forward_structured(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ to_dense().T (+ bias)`` through the factors. x (..., in)."""
        raise NotImplementedError

    def reset_parameters(self, std: float, match_dense_norm: bool = True) -> None:
        """The paper's initialisation, scaled to match a dense N(0, std^2) layer (see subclasses);
        without ``match_dense_norm``, orthogonal factors keep unit singular values, as the
        StructuredFFN papers' code leaves them."""
        raise NotImplementedError

    def _init(self, std: float | None) -> None:
        """First initialisation; a dense layer's default scale ``1 / sqrt(in)`` unless ``std`` is given."""
        self.reset_parameters(std if std is not None else 1.0 / math.sqrt(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if tokens <= (self.merge_threshold or 0) and not torch.is_grad_enabled():
            return F.linear(x, self.merged_weight(), self.bias)
        return self.forward_structured(x, self.bias)

    def merged_weight(self) -> torch.Tensor:
        """The dense equivalent, cached until a factor changes (in place, or by ``.to()``).

        Merged in float32 then cast, so a bfloat16 model's merged weight is the correctly rounded
        product rather than one rounded at every partial sum.
        """
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.factors())
        if self._merged is None or key != self._merged_key:
            with torch.no_grad():
                dtype = self.factors()[0].dtype
                self._merged = self._dense_from(tuple(p.float() for p in self.factors())).to(dtype)
            self._merged_key = key
        return self._merged

    def _dense_from(self, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _scale_to_dense_norm(self, std: float) -> None:
        """Rescale the factors so that ||W||_F^2 equals a dense N(0, std^2) draw's expectation:
        orthogonal blocks alone would give every layer unit singular values whatever its width."""
        with torch.no_grad():
            current = self.to_dense().norm()
            target = std * math.sqrt(self.in_features * self.out_features)
            per_factor = (target / current) ** (1.0 / len(self.factors()))
            for p in self.factors():
                p.mul_(per_factor)


def _orthogonalise_(blocks: torch.Tensor) -> None:
    """Replace each (m, n) block by U Vh of its SVD: the nearest matrix with orthonormal rows/columns."""
    with torch.no_grad():
        U, _, Vh = torch.linalg.svd(blocks, full_matrices=False)
        blocks.copy_(U @ Vh)


def _check_divides(blocks: int, *sizes: int) -> None:
    for s in sizes:
        if s % blocks:
            raise ValueError(f"{blocks} blocks do not divide size {s}")


class LowRankLinear(StructuredLinear):
    """``y = (x V^T) U^T + b``. Initialised from the SVD of a dense N(0, std^2) draw:
    ``V = sqrt(S_r) Vh_r``, ``U = U_r sqrt(S_r)`` (the best rank-r approximation of that draw)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        merge_threshold: int | None = None,
        std: float | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, merge_threshold)
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} must lie in [1, min(in, out) = {min(in_features, out_features)}]")
        self.rank = rank
        self.V = nn.Parameter(torch.empty(rank, in_features))
        self.U = nn.Parameter(torch.empty(out_features, rank))
        self._init(std)

    def reset_parameters(self, std: float, match_dense_norm: bool = True) -> None:
        # the SVD of a dense N(0, std^2) draw has that draw's norm either way
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.V.is_meta:
            return
        with torch.no_grad():
            dense = torch.randn(self.out_features, self.in_features) * std
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            root = S[: self.rank].sqrt()
            self.V.copy_(root[:, None] * Vh[: self.rank])
            self.U.copy_(U[:, : self.rank] * root)

    def factors(self) -> tuple[torch.Tensor, ...]:
        return (self.V, self.U)

    def _dense_from(self, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        V, U = factors
        return U @ V

    def forward_structured(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, bias)  # the bias fused into the second matmul

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class _OrthogonalFactors(StructuredLinear):
    """Layers with factors ``w1`` (block-diagonal) and ``w2``, initialised orthogonal blockwise and
    rescaled to a dense layer's norm."""

    w1: nn.Parameter
    w2: nn.Parameter

    def reset_parameters(self, std: float, match_dense_norm: bool = True) -> None:
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.w1.is_meta:
            return
        for w in (self.w1, self.w2):
            nn.init.normal_(w)
            _orthogonalise_(w)
        if match_dense_norm:
            self._scale_to_dense_norm(std)

    def factors(self) -> tuple[torch.Tensor, ...]:
        return (self.w1, self.w2)


def _block_diagonal(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., B * p) times the block-diagonal matrix of w (B, q, p), block by block: (B, N, q)."""
    B, _, p = w.shape
    return torch.bmm(x.reshape(-1, B, p).transpose(0, 1), w.transpose(1, 2))


class BlockShuffleLinear(_OrthogonalFactors):
    """Two block-diagonal factors with shuffles (Monarch-style), ``B`` blocks each.

    ``w1`` (B, q, in/B) maps each input block to q values, ``q = min(in, out) / B``. The middle
    vector (block-major, length B*q) is regrouped with stride B so that every block of ``w2``
    (B, out/B, q) sees one value from each block of ``w1``; the output is interleaved the same way
    (output ``s * B + l`` comes from block l, row s). Blocks start orthogonal.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: int,
        bias: bool = True,
        merge_threshold: int | None = None,
        std: float | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, merge_threshold)
        _check_divides(blocks, in_features, out_features)
        self.blocks = blocks
        q = min(in_features, out_features) // blocks
        self.w1 = nn.Parameter(torch.empty(blocks, q, in_features // blocks))
        self.w2 = nn.Parameter(torch.empty(blocks, out_features // blocks, q))
        self._init(std)

    def _permutations(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        B, q, s = self.blocks, self.w1.shape[1], self.w2.shape[1]
        mid = torch.arange(B * q, device=device).view(q, B).t().reshape(-1)  # mid'[l*q + r] = mid[r*B + l]
        out = torch.arange(B * s, device=device).view(B, s).t().reshape(-1)  # y[j*B + l] = y'[l*s + j]
        return mid, out

    def _dense_from(self, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        w1, w2 = factors
        mid, out = self._permutations(w1.device)
        bd1 = torch.block_diag(*w1.unbind(0))  # (B*q, in)
        bd2 = torch.block_diag(*w2.unbind(0))  # (out, B*q)
        return bd2[out] @ bd1[mid]

    def forward_structured(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        B, q, _ = self.w1.shape
        s = self.w2.shape[1]
        h = _block_diagonal(x, self.w1)  # (B, N, q)
        n = h.shape[1]
        # The shuffle: the middle vector laid out (q, B) is read as (B, q).
        h = h.transpose(0, 1).reshape(n, q, B).permute(2, 0, 1)  # (B, N, q)
        y = torch.bmm(h, self.w2.transpose(1, 2))  # (B, N, s)
        y = y.permute(1, 2, 0).reshape(*lead, s * B)  # interleave the output blocks
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, blocks={self.blocks}, bias={self.bias is not None}"


class BlockDenseLinear(_OrthogonalFactors):
    """A block-diagonal factor ``w1`` (B, rank/B, in/B) followed by a dense ``w2`` (out, rank), no
    shuffle. Both start orthogonal (blockwise for ``w1``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: int,
        rank: int,
        bias: bool = True,
        merge_threshold: int | None = None,
        std: float | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, merge_threshold)
        _check_divides(blocks, in_features, rank)
        self.blocks, self.rank = blocks, rank
        self.w1 = nn.Parameter(torch.empty(blocks, rank // blocks, in_features // blocks))
        self.w2 = nn.Parameter(torch.empty(out_features, rank))
        self._init(std)

    def _dense_from(self, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        w1, w2 = factors
        return w2 @ torch.block_diag(*w1.unbind(0))

    def forward_structured(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        h = _block_diagonal(x, self.w1)  # (B, N, rank/B)
        h = h.transpose(0, 1).reshape(-1, self.rank)  # (N, rank), blocks in order
        return F.linear(h, self.w2, bias).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, blocks={self.blocks}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


def make_linear(
    in_features: int, out_features: int, structure: LinearStructure, bias: bool = True, std: float | None = None
) -> nn.Linear | StructuredLinear:
    """An ``in -> out`` layer of the kind ``structure`` names (``dense`` gives ``nn.Linear``),
    initialised once to the scale of a dense N(0, std^2) weight (default ``1 / sqrt(in)``)."""
    s, t = structure, structure.merge_threshold
    if s.kind == "dense":
        layer = nn.Linear(in_features, out_features, bias=bias)
        init_linear_(layer, std if std is not None else 1.0 / math.sqrt(in_features))
        return layer
    if s.kind == "lowrank":
        return LowRankLinear(in_features, out_features, s.rank, bias, t, std)  # type: ignore[arg-type]
    if s.kind == "blockshuffle":
        return BlockShuffleLinear(in_features, out_features, s.blocks, bias, t, std)  # type: ignore[arg-type]
    return BlockDenseLinear(in_features, out_features, s.blocks, s.rank, bias, t, std)  # type: ignore[arg-type]


def init_linear_(layer: nn.Module, std: float) -> None:
    """Initialise a dense or structured layer to the scale of a dense N(0, std^2) weight, zero bias."""
    if isinstance(layer, StructuredLinear):
        layer.reset_parameters(std)
        return
    assert isinstance(layer, nn.Linear)
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
