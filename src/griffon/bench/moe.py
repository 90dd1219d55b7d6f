"""Mixture-of-experts FFN speed on this machine: the sorted dispatch against the masked
reference and against a dense FFN of equal active FLOPs.

    griffon bench moe [--width 1024] [--experts 8] [--top-k 2] [--tokens 4096] [--json out.json]

Each expert is Griffin's GeGLU MLP at ``--expert-width`` (default ``3 * width / top_k``, so that a
token's experts together are as wide as the dense model's 3x FFN); the dense FFN has the width of
a token's experts together (``top_k * expert_width``): equal matmul FLOPs per token, less the
router's (``width * experts``, under 1% here). Timed, fp32: forward, and forward+backward, of
``--tokens`` tokens (best of ``--repeats``), as tokens/s. The reference runs every expert on
every token (``experts / top_k`` times the FLOPs). All ratios come from one run; run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse

import torch

from griffon.allocator import keep_freed_memory
from griffon.atomic import atomic_write_json
from griffon.bench.timing import best_time, matmul_peak_flops
from griffon.config import MoEConfig
from griffon.machine import machine
from griffon.nn.mlp import GatedMLP
from griffon.nn.moe import MoE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-width", type=int, help="default: 3 * width / top_k")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write results here")


def timings(fn, x: torch.Tensor, module: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Tokens/s of ``fn(x)`` forward (no autograd) and forward+backward."""

    def train_step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        fn(x).square().mean().backward()

    with torch.no_grad():
        forward = best_time(lambda: fn(x), repeats, warmup=1)
    both = best_time(train_step, repeats, warmup=1)
    return {"forward": x.shape[0] / forward, "forward_backward": x.shape[0] / both}


def run(args: argparse.Namespace) -> None:
    keep_freed_memory()
    torch.manual_seed(0)
    W, k = args.width, args.top_k
    H = args.expert_width or 3 * W // k
    moe = MoE(MoEConfig(num_experts=args.experts, top_k=k), "geglu", W, H)
    dense = GatedMLP(W, k * H)
    x = torch.randn(args.tokens, W, requires_grad=True)
    out: dict = {"machine": machine(), "peak_fp32_flops": matmul_peak_flops(), "width": W, "experts": args.experts,
                 "top_k": k, "expert_width": H, "tokens": args.tokens}  # fmt: skip
    print(f"{out['machine']}  fp32 matmul peak {out['peak_fp32_flops'] / 1e9:.0f} GFLOP/s")
    print(f"width {W}, {args.experts} experts of width {H}, top {k}; dense FFN of width {k * H}; {args.tokens} tokens")
    rows = {
        "dispatch": timings(moe, x, moe, args.repeats),
        "reference": timings(moe.forward_reference, x, moe, args.repeats),
        "dense": timings(dense, x, dense, args.repeats),
    }
    out["tokens_per_s"] = rows
    for phase in ("forward", "forward_backward"):
        d, r, f = (rows[n][phase] for n in ("dispatch", "reference", "dense"))
        out[f"{phase}_vs_reference"], out[f"{phase}_vs_dense"] = d / r, d / f
        print(f"{phase:>16}: dispatch {d:,.0f} tok/s, masked reference {r:,.0f} ({d / r:.2f}x), "
              f"dense of equal active FLOPs {f:,.0f} ({d / f:.2f}x)")  # fmt: skip
    if args.json:
        atomic_write_json(args.json, out)
