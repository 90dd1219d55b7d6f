"""Linear scan fwd+bwd time against the memory bound, per backend.

    griffon bench scan [--batch 4 --seq 2048 --dim 1024] [--json out.json]

The bound is 32 bytes per element for fwd+bwd in fp32 (the forward reads a, x
and writes h; the backward reads dh, a, h and writes da, dx) over the copy bandwidth measured in
the same run. "kernel" times the numba kernels on preallocated buffers; "autograd" goes through
``linear_scan`` and autograd, allocating fresh outputs as training does: first with glibc's
default allocator settings, then after ``griffon.allocator.keep_freed_memory()`` (as the trainer runs).
"""

from __future__ import annotations

import argparse

import numba
import torch

from griffon.allocator import keep_freed_memory
from griffon.atomic import atomic_write_json
from griffon.bench.timing import best_time, copy_bandwidth
from griffon.machine import machine
from griffon.scan import linear_scan
from griffon.scan.cpu import row_split, scan_backward, scan_forward


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--loop", action="store_true", help="also time the portable loop backend (slow)")
    p.add_argument("--json", help="write results here")


def run(args: argparse.Namespace) -> None:
    B, T, D = args.batch, args.seq, args.dim
    n = B * T * D

    bandwidth = copy_bandwidth()
    bound = 32 * n / bandwidth
    a = torch.rand(B, T, D)
    x = torch.randn(B, T, D)
    g = torch.randn(B, T, D)
    reset = torch.zeros(B, T, dtype=torch.bool)
    h0 = torch.zeros(B, D)

    # Kernels alone, on preallocated buffers.
    h, last = torch.empty_like(x), torch.empty_like(h0)
    ga, gx, gh0 = torch.empty_like(x), torch.empty_like(x), torch.empty_like(h0)
    ns = row_split(B)
    arrs = [t.numpy() for t in (a, x, reset, h0, h, last)]
    fwd = best_time(lambda: scan_forward(*arrs, ns), args.repeats)
    bargs = [t.numpy() for t in (a, reset, h0, h, g, last, ga, gx, gh0)]
    bwd = best_time(lambda: scan_backward(*bargs, ns), args.repeats)

    results = {
        "machine": machine() | {"numba_threads": numba.get_num_threads()},
        "shape": [B, T, D],
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "bound_fwd_bwd_ms": bound * 1e3,
        "cpu_kernel": {"fwd_ms": fwd * 1e3, "fwd_bwd_ms": (fwd + bwd) * 1e3, "vs_bound": (fwd + bwd) / bound},
    }
    backends = ["cpu", "loop"] if args.loop else ["cpu"]
    runs = [(b, False) for b in backends] + [("cpu", True)]
    for backend, tuned in runs:
        if tuned:
            keep_freed_memory()
        ar, xr = a.clone().requires_grad_(), x.clone().requires_grad_()

        def step(backend=backend, ar=ar, xr=xr):
            ar.grad = xr.grad = None
            out, _ = linear_scan(ar, xr, backend=backend)
            out.backward(g)

        t = best_time(step, args.repeats if backend == "cpu" else 1)
        key = f"{backend}_autograd" + ("_keep_freed_memory" if tuned else "")
        results[key] = {"fwd_bwd_ms": t * 1e3, "vs_bound": t / bound}

    print(f"scan {B}x{T}x{D} fp32 on {results['machine']['cpu']} ({results['machine']['threads']} threads)")
    print(f"  copy bandwidth {bandwidth / 1e9:.1f} GB/s -> fwd+bwd memory bound {bound * 1e3:.2f} ms")
    k = results["cpu_kernel"]
    print(f"  cpu kernels      fwd {k['fwd_ms']:.2f} ms, fwd+bwd {k['fwd_bwd_ms']:.2f} ms = {k['vs_bound']:.2f}x bound")
    for backend, tuned in runs:
        r = results[f"{backend}_autograd" + ("_keep_freed_memory" if tuned else "")]
        label = f"{backend} autograd" + (", keep_freed_memory" if tuned else "")
        print(f"  {label:<33} fwd+bwd {r['fwd_bwd_ms']:.2f} ms = {r['vs_bound']:.2f}x bound")
    if args.json:
        atomic_write_json(args.json, results)
