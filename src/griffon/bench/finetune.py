"""LoRA against full fine-tuning: peak memory and tokens/s of the same training step.

    griffon bench finetune [--preset griffin-60m --batch 1 --seq 64 --rank 16] [--json out.json]

Both train the same model on the same batch (forward, cross-entropy, backward, AdamW): full
fine-tuning updates every weight, LoRA (:mod:`griffon.checkpoint.adapters`, peft) adapters of rank
``--rank`` on the default linears with the rest frozen, so neither gradients nor optimizer state
exist for the frozen weights. Each mode runs in a process of its own so that their memory does not
mix: on a GPU its peak is ``torch.cuda.max_memory_allocated``; on the CPU it is the process's peak
resident memory (``ru_maxrss``) less what it held before the model was built (Python, torch), so
it counts the weights, gradients, optimizer state, activations and the allocator's slack. Tokens/s
is the best of ``--repeats`` steps after one warmup step.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

from griffon.atomic import atomic_write_json
from griffon.machine import machine

MODES = ("full", "lora")


def _measure(mode: str, preset: str, batch: int, seq: int, rank: int, repeats: int, device: str) -> dict:
    """One mode's step, measured in this (fresh) process."""
    import torch
    from torch.nn import functional as F

    from griffon import Griffon, get_preset
    from griffon.allocator import keep_freed_memory
    from griffon.checkpoint.adapters import apply_lora

    keep_freed_memory()  # as `griffon train` does
    cuda = device == "cuda"
    # What either mode holds before its model: peft imported, and torch's kernels, thread pools and
    # autograd engine started by a small step, so that the baseline is the same for both.
    import peft  # noqa: F401

    warm = torch.nn.Linear(64, 64)
    warm(torch.randn(8, 64)).sum().backward()
    del warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = Griffon(cfg).to(device)
    if mode == "lora":
        apply_lora(model, rank, 2.0 * rank, 0.0, None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    seg = torch.arange(seq + 1, device=device).expand(batch, -1)

    def step() -> None:
        logits, _ = model(tokens[:, :-1], seg[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_memory_bytes": peak,
        "tokens_per_s": batch * seq / min(times[1:]),
    }


def _child(queue, *args) -> None:
    queue.put(_measure(*args))


def measure_in_own_process(*args) -> dict:
    """:func:`_measure` in a fresh (spawned) process, so that its peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="griffin-60m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", help="write results here")


def run(args: argparse.Namespace) -> None:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    info = machine()
    results: dict = {"machine": info, "preset": args.preset, "batch": args.batch, "seq": args.seq,
                     "rank": args.rank, "device": device, "modes": {}}  # fmt: skip
    where = info["cuda"] or f"{info['cpu']} ({info['threads']} threads)"
    print(f"{args.preset}, batch {args.batch} x seq {args.seq}, fp32, on {where}")
    for mode in MODES:
        r = measure_in_own_process(mode, args.preset, args.batch, args.seq, args.rank, args.repeats, device)
        results["modes"][mode] = r
        print(f"  {mode:<5} {r['trainable_params'] / 1e6:8.2f}M of {r['params'] / 1e6:.2f}M params train   "
              f"peak {r['peak_memory_bytes'] / 2**20:7.0f} MiB   {r['tokens_per_s']:8.0f} tokens/s")  # fmt: skip
    full, lora = results["modes"]["full"], results["modes"]["lora"]
    results["memory_ratio"] = lora["peak_memory_bytes"] / full["peak_memory_bytes"]
    results["speed_ratio"] = lora["tokens_per_s"] / full["tokens_per_s"]
    print(f"  LoRA / full: peak memory {results['memory_ratio']:.2f}x, tokens/s {results['speed_ratio']:.2f}x")
    if args.json:
        atomic_write_json(args.json, results)
