"""Structured FFN speed on this machine: training step and decode-time latency against dense.

    griffon bench ffn [--widths 1024 2048] [--tokens 4096] [--json out.json]

FFN = the StructuredFFN papers' GeLU MLP (width -> 4 width -> width, biases), fp32. For each width:

1. fwd+bwd time of the whole FFN on ``--tokens`` tokens for dense and each structured kind at
   63% and 32% of the dense FFN's parameters (LowRank r = w/2, w/4; BlockShuffle B = 2, 4;
   BlockDense B = 4 with R = 3w/4, 3w/8, the paper's xl rows scaled), with the speedup over dense.
2. Decode latency (forward, no autograd) at 1, 4, 16, 64 tokens per call: dense, structured
   factors, pre-merged dense weight, and the thresholds that
   :func:`griffon.decode.calibrate_merge_thresholds` measures (what `griffon sample` uses).

All ratios come from one run; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from griffon.allocator import keep_freed_memory
from griffon.atomic import atomic_write_json
from griffon.bench.timing import best_time, matmul_peak_flops
from griffon.config import LinearStructure
from griffon.decode.calibration import calibrate_merge_thresholds
from griffon.machine import machine
from griffon.nn.mlp import GeluMLP
from griffon.nn.structured import StructuredLinear


def kinds(width: int) -> dict[str, LinearStructure]:
    return {
        "dense": LinearStructure(),
        "lowrank-63%": LinearStructure("lowrank", rank=width // 2),
        "blockshuffle-63%": LinearStructure("blockshuffle", blocks=2),
        "blockdense-63%": LinearStructure("blockdense", blocks=4, rank=3 * width // 4),
        "lowrank-32%": LinearStructure("lowrank", rank=width // 4),
        "blockshuffle-32%": LinearStructure("blockshuffle", blocks=4),
        "blockdense-32%": LinearStructure("blockdense", blocks=4, rank=3 * width // 8),
    }


def set_threshold(mlp: nn.Module, threshold: int) -> None:
    for m in mlp.modules():
        if isinstance(m, StructuredLinear):
            m.merge_threshold = threshold


def train_step_time(mlp: nn.Module, x: torch.Tensor, repeats: int) -> float:
    def step() -> None:
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        mlp(x).sum().backward()

    return best_time(step, repeats)


def call_time(mlp: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        return best_time(lambda: mlp(x), repeats, warmup=3)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write results here")


def run(args: argparse.Namespace) -> None:
    keep_freed_memory()  # as the trainer does: no page faults on every fresh activation
    torch.manual_seed(0)
    out: dict = {"machine": machine(), "peak_fp32_flops": matmul_peak_flops(), "tokens": args.tokens, "widths": {}}
    print(f"{out['machine']}  fp32 matmul peak {out['peak_fp32_flops'] / 1e9:.0f} GFLOP/s")
    for width in args.widths:
        res: dict = {"train": {}, "decode_us": {}, "crossover_tokens": {}}
        x = torch.randn(args.tokens, width, requires_grad=True)
        dense_params = None
        print(f"\n== width {width}: FFN fwd+bwd on {args.tokens} tokens")
        for name, structure in kinds(width).items():
            mlp = GeluMLP(width, 4 * width, structure=structure)
            params = sum(p.numel() for n, p in mlp.named_parameters() if not n.endswith("bias"))
            dense_params = dense_params or params
            t = train_step_time(mlp, x, args.repeats)
            res["train"][name] = {"params": params, "fraction": params / dense_params, "seconds": t}
            speedup = res["train"]["dense"]["seconds"] / t
            res["train"][name]["speedup"] = speedup
            print(f"{name:18s} params {params / dense_params:5.1%}  {t * 1e3:8.1f} ms  {speedup:4.2f}x dense")

            sizes = [1, 4, 16, 64]
            if structure.kind == "dense":
                res["decode_us"][name] = {n: call_time(mlp, torch.randn(n, width), 20) * 1e6 for n in sizes}
                continue
            calibrated = calibrate_merge_thresholds(mlp)  # what griffon sample does first
            res["crossover_tokens"][name] = calibrated
            row = {}
            for n in sizes:
                xn = torch.randn(n, width)
                set_threshold(mlp, 0)
                structured = call_time(mlp, xn, 20)
                set_threshold(mlp, 1 << 30)
                merged = call_time(mlp, xn, 20)
                for layer_name, threshold in calibrated.items():
                    mlp.get_submodule(layer_name).merge_threshold = threshold
                auto = call_time(mlp, xn, 20)
                row[n] = {"structured": structured * 1e6, "merged": merged * 1e6, "calibrated": auto * 1e6}
            res["decode_us"][name] = row

        print(f"\n== width {width}: decode latency (us per FFN call: factors, merged, calibrated threshold)")
        print(f"{'':18s} " + "  ".join(f"{n:>30d} tok" for n in (1, 4, 16, 64)))
        dense_row = res["decode_us"]["dense"]
        print(f"{'dense':18s} " + "  ".join(f"{dense_row[n]:34.0f}" for n in (1, 4, 16, 64)))
        for name, row in res["decode_us"].items():
            if name == "dense":
                continue
            cells = [
                f"{r['structured']:7.0f} fact {r['merged']:7.0f} mrg {r['calibrated']:7.0f} cal" for r in row.values()
            ]
            print(
                f"{name:18s} "
                + "  ".join(cells)
                + f"   thresholds {sorted(set(res['crossover_tokens'][name].values()))}"
            )
        out["widths"][width] = res
    if args.json:
        atomic_write_json(args.json, out)
