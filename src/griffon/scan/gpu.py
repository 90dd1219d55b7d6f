"""GPU linear scans in Triton: the plain scan ``h_t = a_t h_{t-1} + x_t`` and the fused RG-LRU.

Layout. A (B, T, D) batch is read as a flat (B*T, D) stream of B sequences; with ``cu_seqlens``
(flash-attention's convention: (N+1,) int32 offsets into a (1, total, D) stream) it is N packed
sequences of any lengths, each with its own initial and final state. Inside a sequence, ``reset``
drops the carried state (a document start inside a packed row).

Kernel. A program owns ``BD`` channels of one sequence and walks time in tiles of ``BT`` rows: it
loads a (BT, BD) tile, scans it with ``tl.associative_scan`` on pairs (a, x) under composition of
the affine maps ``h -> a h + x``, and applies the carry from the previous tile. Each input is read
once and each output written once; the state is float32 whatever the inputs' dtype.

Chunks. When sequences x channel blocks are too few programs to fill the GPU (long T, small B*D),
time is split into chunks: pass 1 summarises each chunk as one affine map (product of a, state
from zero), pass 2 carries the state across a sequence's chunks, pass 3 replays each chunk from
its true initial state.

Backward. The gradient ``g_t = dL/dh_t`` obeys the same recurrence in reverse time,
``g_t = dh_t + a'_{t+1} g_{t+1}`` (``a'`` is ``a`` with resets zeroed; ``g`` of the last step gets
``dL/dh_last``), so backward is the same tiled scan over descending rows, chunked the same way.
It reads the forward's float32 states for ``da_t = g_t h_{t-1}``.

Fused RG-LRU (``GATED``). The kernels also take the RG-LRU's pre-activation gates and compute, per
element, exactly what :class:`griffon.nn.rglru.RGLRU` computes in PyTorch: ``a = exp(-8 sigmoid(z_a)
softplus(Lambda))``, ``x' = x sigmoid(z_x) sqrt(1 - a^2)`` (multiplier 1 at a reset), then the
scan. Backward recomputes the gates from the inputs instead of storing them, with the same
bounded ``sqrt`` derivative as the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from griffon.packing import check_cu_seqlens


@triton.jit
def _compose(a1, x1, a2, x2):
    # Applying h -> a1 h + x1, then h -> a2 h + x2.
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _bounds(CU, n, T, VARLEN: tl.constexpr):
    if VARLEN:
        bos = tl.load(CU + n).to(tl.int64)
        eos = tl.load(CU + n + 1).to(tl.int64)
    else:
        bos = n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def _last_row(tile, BT: tl.constexpr):
    # The tile's last row (BD,): padding rows are identity maps, so it is the last real row's value.
    rows = tl.arange(0, BT)
    return tl.sum(tl.where((rows == BT - 1)[:, None], tile, 0.0), axis=0)


@triton.jit
def _decay(A, ZA, sp, off, mask, keep, GATED: tl.constexpr, C: tl.constexpr):
    """a'_t (BT, BD) float32 at the rows of ``off``: ``a`` with resets zeroed, 1 outside ``mask``."""
    if GATED:
        ga = tl.sigmoid(tl.load(ZA + off, mask=mask, other=0.0).to(tl.float32))
        a = tl.exp(-C * ga * sp[None, :])
    else:
        a = tl.load(A + off, mask=mask, other=1.0).to(tl.float32)
    return tl.where(mask, tl.where(keep[:, None], a, 0.0), 1.0)


@triton.jit
def _fwd_kernel(
    A, X, ZX, ZA, SP, RESET, CU, INIT,  # inputs
    Y, H32, HLAST, SUM_A, SUM_H,  # outputs
    T, D, CHUNK, NC,
    GATED: tl.constexpr, VARLEN: tl.constexpr, HAS_INIT: tl.constexpr, SUMMARY: tl.constexpr,
    STORE_H32: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    pid_d, n, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = _bounds(CU, n, T, VARLEN)
    start = bos + c * CHUNK
    if start < eos:
        end = tl.minimum(start + CHUNK, eos)
        cols = pid_d * BD + tl.arange(0, BD)
        cmask = cols < D
        chunk_off = (n * NC + c).to(tl.int64) * D + cols
        if HAS_INIT:
            h = tl.load(INIT + chunk_off, mask=cmask, other=0.0).to(tl.float32)
        else:
            h = tl.zeros([BD], dtype=tl.float32)
        sp = tl.load(SP + cols, mask=cmask, other=0.0).to(tl.float32) if GATED else h
        a_prod = tl.full([BD], 1.0, dtype=tl.float32)
        for t0 in range(start, end, BT):
            r = t0 + tl.arange(0, BT)
            rmask = r < end
            mask = rmask[:, None] & cmask[None, :]
            off = r[:, None] * D + cols[None, :]
            keep = tl.load(RESET + r, mask=rmask, other=0) == 0
            a = _decay(A, ZA, sp, off, mask, keep, GATED, C)  # (BT, BD) float32
            x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            if GATED:
                gx = tl.sigmoid(tl.load(ZX + off, mask=mask, other=0.0).to(tl.float32))
                ga = tl.sigmoid(tl.load(ZA + off, mask=mask, other=0.0).to(tl.float32))
                multiplier = tl.sqrt(1.0 - tl.exp(2.0 * (-C * ga * sp[None, :])))
                x = x * gx * tl.where(keep[:, None], multiplier, 1.0)
            a_cum, x_cum = tl.associative_scan((a, x), 0, _compose)
            hs = a_cum * h[None, :] + x_cum  # (BT, BD) states
            if SUMMARY:
                a_prod = a_prod * _last_row(a_cum, BT)
            else:
                tl.store(Y + off, hs.to(Y.dtype.element_ty), mask=mask)
                if STORE_H32:
                    tl.store(H32 + off, hs, mask=mask)
            h = _last_row(hs, BT)
        if SUMMARY:
            tl.store(SUM_A + chunk_off, a_prod, mask=cmask)
            tl.store(SUM_H + chunk_off, h, mask=cmask)
        elif end == eos:
            tl.store(HLAST + n.to(tl.int64) * D + cols, h, mask=cmask)


@triton.jit
def _bwd_kernel(
    A, X, ZX, ZA, SP, RESET, CU, H0, H, DY, GIN,  # inputs
    DA, DX, DZX, DZA, DSP, DH0, SUM_C, SUM_G,  # outputs
    T, D, CHUNK, NC,
    GATED: tl.constexpr, VARLEN: tl.constexpr, HAS_H0: tl.constexpr, SUMMARY: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, C: tl.constexpr, MIN_4U: tl.constexpr,
):  # fmt: skip
    pid_d, n, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = _bounds(CU, n, T, VARLEN)
    start = bos + c * CHUNK
    if start < eos:
        end = tl.minimum(start + CHUNK, eos)
        cols = pid_d * BD + tl.arange(0, BD)
        cmask = cols < D
        chunk_off = (n * NC + c).to(tl.int64) * D + cols
        seq_off = n.to(tl.int64) * D + cols
        if SUMMARY:
            g = tl.zeros([BD], dtype=tl.float32)
        else:
            g = tl.load(GIN + chunk_off, mask=cmask, other=0.0).to(tl.float32)
        if HAS_H0:
            h0 = tl.load(H0 + seq_off, mask=cmask, other=0.0).to(tl.float32)
        else:
            h0 = tl.zeros([BD], dtype=tl.float32)
        sp = tl.load(SP + cols, mask=cmask, other=0.0).to(tl.float32) if GATED else h0
        c_prod = tl.full([BD], 1.0, dtype=tl.float32)
        dsp = tl.zeros([BD], dtype=tl.float32)
        for i in range(0, tl.cdiv(end - start, BT)):
            r = end - 1 - i * BT - tl.arange(0, BT)  # descending rows
            rmask = r >= start
            mask = rmask[:, None] & cmask[None, :]
            off = r[:, None] * D + cols[None, :]
            # The coefficient carrying g_{t+1} into g_t is a'_{t+1}; 1 for the last step (dL/dh_last).
            nxt = r + 1
            nmask = rmask & (nxt < eos)
            nkeep = tl.load(RESET + nxt, mask=nmask, other=0) == 0
            coef = _decay(A, ZA, sp, off + D, nmask[:, None] & cmask[None, :], nkeep, GATED, C)
            coef = tl.where(mask, coef, 1.0)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
            c_cum, g_cum = tl.associative_scan((coef, dy), 0, _compose)
            gs = c_cum * g[None, :] + g_cum  # (BT, BD): dL/dh_t
            if SUMMARY:
                c_prod = c_prod * _last_row(c_cum, BT)
            else:
                keep = tl.load(RESET + r, mask=rmask, other=0) == 0
                pmask = mask & (r > bos)[:, None]
                h_prev = tl.load(H + off - D, mask=pmask, other=0.0).to(tl.float32)
                h_prev = tl.where((r == bos)[:, None], h0[None, :], h_prev)
                dkeep = tl.where(keep[:, None] & mask, gs, 0.0)  # g where the carried state counts
                if GATED:
                    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
                    gx = tl.sigmoid(tl.load(ZX + off, mask=mask, other=0.0).to(tl.float32))
                    ga = tl.sigmoid(tl.load(ZA + off, mask=mask, other=0.0).to(tl.float32))
                    log_a = -C * ga * sp[None, :]
                    a = tl.exp(log_a)
                    a2 = tl.exp(2.0 * log_a)
                    u = 1.0 - a2
                    multiplier = tl.where(keep[:, None], tl.sqrt(u), 1.0)
                    tl.store(DX + off, (gs * gx * multiplier).to(DX.dtype.element_ty), mask=mask)
                    d_gx = gs * x * multiplier
                    tl.store(DZX + off, (d_gx * gx * (1.0 - gx)).to(DZX.dtype.element_ty), mask=mask)
                    d_mult = dkeep * x * gx
                    d_u = d_mult / tl.sqrt(tl.maximum(4.0 * u, MIN_4U))
                    d_log_a = dkeep * h_prev * a - 2.0 * a2 * d_u
                    d_ga = d_log_a * (-C) * sp[None, :]
                    tl.store(DZA + off, (d_ga * ga * (1.0 - ga)).to(DZA.dtype.element_ty), mask=mask)
                    dsp += tl.sum(tl.where(mask, d_log_a * (-C) * ga, 0.0), axis=0)
                else:
                    tl.store(DX + off, gs.to(DX.dtype.element_ty), mask=mask)
                    tl.store(DA + off, (dkeep * h_prev).to(DA.dtype.element_ty), mask=mask)
            g = _last_row(gs, BT)
        if SUMMARY:
            tl.store(SUM_C + chunk_off, c_prod, mask=cmask)
            tl.store(SUM_G + chunk_off, g, mask=cmask)
        else:
            if GATED:
                tl.store(DSP + chunk_off, dsp, mask=cmask)
            if start == bos:  # dL/dh0 = a'_bos g_bos
                first = bos + tl.arange(0, 1)
                keep0 = tl.load(RESET + first) == 0
                a0 = _decay(A, ZA, sp, first[:, None] * D + cols[None, :], cmask[None, :], keep0, GATED, C)
                tl.store(DH0 + seq_off, _last_row(a0, 1) * g, mask=cmask)


@triton.jit
def _carry_kernel(
    SUM_A, SUM_H, INIT, OUT, CU, T, D, CHUNK, NC,
    HAS_INIT: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """OUT[chunk] = the state entering each chunk of a sequence, from the chunks' summaries."""
    pid_d, n = tl.program_id(0), tl.program_id(1)
    bos, eos = _bounds(CU, n, T, VARLEN)
    n_chunks = tl.cdiv(eos - bos, CHUNK)
    cols = pid_d * BD + tl.arange(0, BD)
    cmask = cols < D
    if HAS_INIT:
        h = tl.load(INIT + n.to(tl.int64) * D + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BD], dtype=tl.float32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i if REVERSE else i
        off = (n * NC + c).to(tl.int64) * D + cols
        tl.store(OUT + off, h, mask=cmask)
        h = tl.load(SUM_A + off, mask=cmask, other=1.0) * h + tl.load(SUM_H + off, mask=cmask, other=0.0)


# Tile sizes: a program (4 warps) scans (BLOCK_T, BLOCK_D) tiles; BLOCK_D contiguous float32
# channels make coalesced 256-byte rows. Compiled for sm_90, 16 x 64 tiles take 48-80 registers per
# thread (168 in the fused backward) without spills; 32 x 64 took 125-255 and spilled in the fused
# backward (cuobjdump -res-usage). Programs per SM below which time is split into chunks.
BLOCK_T = 16
BLOCK_D = 64
_PROGRAMS_PER_SM = 4


def _programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _chunk_length(n_programs: int, max_len: int, device: torch.device, block_t: int) -> int:
    """Time steps per chunk: the whole sequence unless too few programs would run."""
    wanted = _programs_wanted(device)
    if n_programs >= wanted or max_len <= 4 * block_t:
        return max(max_len, 1)
    n_chunks = min(-(-wanted // n_programs), -(-max_len // (4 * block_t)))
    return -(-max_len // (n_chunks * block_t)) * block_t


class _Geometry:
    """Where the sequences lie in the flat stream and how the kernels are launched over them."""

    def __init__(
        self, B: int, T: int, D: int, cu_seqlens: torch.Tensor | None, device, chunk, block_t, block_d,
        c: float = 0.0, min_4u: float = 0.0,
    ) -> None:  # fmt: skip
        # c and min_4u, the RG-LRU's exponent and floor on 4u (the sqrt derivative's bound), are
        # constexpr arguments of every kernel; only the gated (RG-LRU) paths read them.
        self.c, self.min_4u = c, min_4u
        self.varlen = cu_seqlens is not None
        self.T = T
        self.D = D
        if self.varlen:
            self.cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
            self.N = cu_seqlens.numel() - 1
            max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        else:
            self.cu = torch.empty(1, dtype=torch.int32, device=device)
            self.N, max_len = B, T
        self.bt, self.bd = block_t, block_d
        self.d_blocks = triton.cdiv(D, block_d)
        self.chunk = chunk or _chunk_length(self.N * self.d_blocks, max_len, device, block_t)
        self.NC = max(1, triton.cdiv(max_len, self.chunk))

    def grid(self) -> tuple[int, int, int]:
        return (self.d_blocks, self.N, self.NC)

    def common(self) -> dict:
        return dict(T=self.T, D=self.D, CHUNK=self.chunk, NC=self.NC, VARLEN=self.varlen, BD=self.bd)

    def constants(self) -> dict:
        return dict(BT=self.bt, C=self.c, **self.common())


def _carry(geo: _Geometry, sum_a, sum_h, init, reverse: bool) -> torch.Tensor:
    out = torch.empty_like(sum_a)
    _carry_kernel[(geo.d_blocks, geo.N)](
        sum_a, sum_h, init if init is not None else sum_a, out, geo.cu,
        HAS_INIT=init is not None, REVERSE=reverse, **geo.common(),
    )  # fmt: skip
    return out


def _forward(geo: _Geometry, a, x, zx, za, sp, reset, h0, store_h32: bool):
    """Launch the forward scan; returns (y in x's dtype, float32 states or None, final states (N, D))."""
    gated = zx is not None
    y = torch.empty_like(x)
    h32 = torch.empty(x.shape, dtype=torch.float32, device=x.device) if store_h32 else None
    h_last = torch.zeros(geo.N, geo.D, dtype=torch.float32, device=x.device)
    dummy = x
    args = dict(A=a if a is not None else dummy, X=x, ZX=zx if gated else dummy, ZA=za if gated else dummy,
                SP=sp if gated else dummy, RESET=reset, CU=geo.cu)  # fmt: skip
    init = h0
    if geo.NC > 1:
        sums = torch.empty(2, geo.N * geo.NC, geo.D, dtype=torch.float32, device=x.device)
        _fwd_kernel[geo.grid()](
            **args, INIT=dummy, Y=dummy, H32=dummy, HLAST=dummy, SUM_A=sums[0], SUM_H=sums[1],
            GATED=gated, HAS_INIT=False, SUMMARY=True, STORE_H32=False, **geo.constants(),
        )  # fmt: skip
        init = _carry(geo, sums[0], sums[1], h0, reverse=False)
    _fwd_kernel[geo.grid()](
        **args, INIT=init if init is not None else dummy, Y=y, H32=h32 if h32 is not None else dummy,
        HLAST=h_last, SUM_A=dummy, SUM_H=dummy, GATED=gated, HAS_INIT=init is not None, SUMMARY=False,
        STORE_H32=store_h32, **geo.constants(),
    )  # fmt: skip
    return y, h32, h_last


def _backward(geo: _Geometry, a, x, zx, za, sp, reset, h0, h, dy, d_last):
    """Launch the reverse scan; returns (da or None, dx, dzx, dza, dsp (D,) or None, dh0 (N, D))."""
    gated = zx is not None
    dy = dy.contiguous() if dy is not None else torch.zeros_like(h)
    d_last = d_last.contiguous().float() if d_last is not None else torch.zeros(geo.N, geo.D, device=h.device)
    dummy = h
    dx = torch.empty_like(x)
    da = None if gated else torch.empty_like(a)
    dzx, dza = (torch.empty_like(zx), torch.empty_like(za)) if gated else (None, None)
    dsp = torch.zeros(geo.N * geo.NC, geo.D, dtype=torch.float32, device=h.device) if gated else None
    dh0 = torch.empty(geo.N, geo.D, dtype=torch.float32, device=h.device)
    args = dict(A=a if a is not None else dummy, X=x, ZX=zx if gated else dummy, ZA=za if gated else dummy,
                SP=sp if gated else dummy, RESET=reset, CU=geo.cu, H0=h0 if h0 is not None else dummy, H=h, DY=dy,
                GATED=gated, HAS_H0=h0 is not None, MIN_4U=geo.min_4u, **geo.constants())  # fmt: skip
    g_in = d_last
    if geo.NC > 1:
        sums = torch.empty(2, geo.N * geo.NC, geo.D, dtype=torch.float32, device=h.device)
        _bwd_kernel[geo.grid()](
            **args, GIN=dummy, DA=dummy, DX=dummy, DZX=dummy, DZA=dummy, DSP=dummy, DH0=dummy,
            SUM_C=sums[0], SUM_G=sums[1], SUMMARY=True,
        )  # fmt: skip
        g_in = _carry(geo, sums[0], sums[1], d_last, reverse=True)
    _bwd_kernel[geo.grid()](
        **args, GIN=g_in, DA=da if da is not None else dummy, DX=dx, DZX=dzx if gated else dummy,
        DZA=dza if gated else dummy, DSP=dsp if gated else dummy, DH0=dh0, SUM_C=dummy, SUM_G=dummy, SUMMARY=False,
    )  # fmt: skip
    return da, dx, dzx, dza, None if dsp is None else dsp.sum(0), dh0


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, h0, reset, geo):  # type: ignore[override]
        store_h32 = x.dtype != torch.float32 and ctx.needs_input_grad[0]
        y, h32, h_last = _forward(geo, a, x, None, None, None, reset, h0, store_h32)
        ctx.save_for_backward(a, x, h0, reset, h32 if store_h32 else y)
        ctx.geo = geo
        return y, h_last

    @staticmethod
    def backward(ctx, dy, d_last):  # type: ignore[override]
        a, x, h0, reset, h = ctx.saved_tensors
        da, dx, _, _, _, dh0 = _backward(ctx.geo, a, x, None, None, None, reset, h0, h, dy, d_last)
        return da, dx, None if h0 is None else dh0.to(h0.dtype), None, None


class _GatedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, zx, za, sp, h0, reset, geo):  # type: ignore[override]
        needs_grad = any(ctx.needs_input_grad[:5])
        store_h32 = x.dtype != torch.float32 and needs_grad
        y, h32, h_last = _forward(geo, None, x, zx, za, sp, reset, h0, store_h32)
        ctx.save_for_backward(x, zx, za, sp, h0, reset, h32 if store_h32 else y)
        ctx.geo = geo
        return y, h_last

    @staticmethod
    def backward(ctx, dy, d_last):  # type: ignore[override]
        x, zx, za, sp, h0, reset, h = ctx.saved_tensors
        _, dx, dzx, dza, dsp, dh0 = _backward(ctx.geo, None, x, zx, za, sp, reset, h0, h, dy, d_last)
        return dx, dzx, dza, dsp, None if h0 is None else dh0.to(h0.dtype), None, None


_STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _prepare(x: torch.Tensor, h0, reset, cu_seqlens, name: str):
    """Validate shapes at the boundary and return (geometry args, h0, reset as uint8 (B*T,))."""
    if x.dim() != 3:
        raise ValueError(f"{name} expects (B, T, D) inputs, got shape {tuple(x.shape)}")
    if x.dtype not in _STREAM_DTYPES:
        raise ValueError(f"{name} takes float32, bfloat16 or float16 inputs, got {x.dtype}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 to interpret the kernels on the CPU)")
    B, T, D = x.shape
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the inputs are one packed stream (1, total, D); got batch {B}")
        check_cu_seqlens(cu_seqlens, T)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if h0 is not None and (h0.shape != (N, D) or h0.dtype != torch.float32):
        raise ValueError(f"h0 must be ({N}, {D}) float32 (one state per sequence), got {tuple(h0.shape)} {h0.dtype}")
    if reset is None:
        reset = torch.zeros(B * T, dtype=torch.uint8, device=x.device)
    elif reset.shape != (B, T) or reset.dtype != torch.bool:
        raise ValueError(f"reset must be a ({B}, {T}) bool tensor, got {tuple(reset.shape)} {reset.dtype}")
    else:
        reset = reset.reshape(-1).to(torch.uint8)
    return (B, T, D), None if h0 is None else h0.contiguous(), reset


# Dynamo cannot trace the kernels' host-side launch logic: a compiled model calls them eagerly.
@torch.compiler.disable
def linear_scan_gpu(
    a: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    chunk: int | None = None,
    block_t: int = BLOCK_T,
    block_d: int = BLOCK_D,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_t = a_t h_{t-1} + x_t`` in Triton, differentiable in ``a``, ``x`` and ``h0``.

    Args:
        a, x: (B, T, D) float32, bfloat16 or float16 (same dtype); the state is float32 throughout.
        h0: (N, D) float32 initial states, zeros when ``None``; N is B, or the number of sequences.
        reset: (B, T) bool; where true the carried state is dropped.
        cu_seqlens: (N+1,) offsets of N sequences packed in a (1, total, D) stream, each started
            from its own ``h0`` row and ending in its own final state.
        chunk: time steps per chunk (default: chosen to fill the GPU); block_t, block_d: tile shape.

    Returns:
        ``(h, h_last)``: states (B, T, D) in ``x``'s dtype and final states (N, D) float32.
    """
    if a.shape != x.shape or a.dtype != x.dtype:
        raise ValueError(f"a and x must match: {tuple(a.shape)} {a.dtype} vs {tuple(x.shape)} {x.dtype}")
    (B, T, D), h0, reset = _prepare(x, h0, reset, cu_seqlens, "linear_scan_gpu")
    geo = _Geometry(B, T, D, cu_seqlens, x.device, chunk, block_t, block_d)
    return _Scan.apply(a.contiguous(), x.contiguous(), h0, reset, geo)


@torch.compiler.disable
def rglru_scan_gpu(
    x: torch.Tensor,
    gate_x: torch.Tensor,
    gate_a: torch.Tensor,
    softplus_a: torch.Tensor,
    h0: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    c: float,
    max_sqrt_gradient: float,
    chunk: int | None = None,
    block_t: int = BLOCK_T,
    block_d: int = BLOCK_D,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RG-LRU after its gate matmuls, fused: the gates' activations, decay, multiplier and scan.

    Args:
        x: (B, T, D) the recurrence's input (after the Conv1D).
        gate_x, gate_a: (B, T, D) pre-sigmoid input and recurrence gates, any of the stream dtypes.
        softplus_a: (D,) float32 ``softplus(Lambda)``, so ``log a_t = -c sigmoid(gate_a) softplus_a``.
        c, max_sqrt_gradient: the RG-LRU's constants (:data:`griffon.nn.rglru.RGLRU_C` and
            :data:`griffon.nn.rglru.MAX_SQRT_GRADIENT`), the bound on d sqrt(u)/du in backward.
        h0, reset, cu_seqlens, chunk, block_t, block_d: as :func:`linear_scan_gpu`.

    Returns:
        ``(y, h_last)``: the RG-LRU's output (B, T, D) in ``x``'s dtype and final states (N, D) float32.
    """
    if gate_x.shape != x.shape or gate_a.shape != x.shape:
        raise ValueError(
            f"gates must have x's shape {tuple(x.shape)}, got {tuple(gate_x.shape)}, {tuple(gate_a.shape)}"
        )
    (B, T, D), h0, reset = _prepare(x, h0, reset, cu_seqlens, "rglru_scan_gpu")
    if softplus_a.shape != (D,) or softplus_a.dtype != torch.float32:
        raise ValueError(f"softplus_a must be ({D},) float32, got {tuple(softplus_a.shape)} {softplus_a.dtype}")
    geo = _Geometry(B, T, D, cu_seqlens, x.device, chunk, block_t, block_d, c, 1.0 / max_sqrt_gradient**2)
    return _GatedScan.apply(
        x.contiguous(), gate_x.contiguous(), gate_a.contiguous(), softplus_a.contiguous(), h0, reset, geo
    )
