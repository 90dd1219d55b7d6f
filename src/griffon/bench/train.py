"""Training throughput of griffon vs HF RecurrentGemma vs the DeepMind port, on one small config.

    griffon bench train [--preset griffin-small --batch 2 --seq 2048] [--json out.json]

All three train the same model (the same weights, converted) with the same step: forward,
cross-entropy, backward, AdamW. Tokens/s are measured in one run, so their ratios are
comparable even on a noisy machine; MFU counts the model's real FLOPs
(``griffon.accounting.train_flops_per_token``: matmuls, windowed attention, conv) against the
fp32 matmul throughput measured in the same run. glibc is told to keep freed memory
(``griffon.allocator``) for all three, as ``griffon train`` does.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from griffon import Griffon, get_preset, references
from griffon.accounting import train_flops_per_token
from griffon.allocator import keep_freed_memory
from griffon.atomic import atomic_write_json
from griffon.bench.timing import best_time, matmul_peak_flops
from griffon.machine import machine


def reference_models(cfg):
    """(HF model, DeepMind model) with griffon's config, or None where the package is missing."""
    models = {}
    try:
        models["deepmind"], ours = references.deepmind_pair(cfg)
    except references.ReferenceUnavailable as e:
        print(f"deepmind port unavailable: {e}")
        ours = Griffon(cfg)
    try:
        models["hf"], _ = references.hf_pair(
            cfg.replace(attention_window=cfg.attention_history + 1, window_semantics="hf")
        )
    except references.ReferenceUnavailable as e:
        print(f"HF transformers unavailable: {e}")
    return ours, models


def make_step(kind, model, tokens, segment_pos):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg = segment_pos[:, :-1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        if kind == "griffon":
            return model(inputs, seg)[0]
        if kind == "deepmind":
            return model(inputs, seg, return_cache=False)[0]
        return model(input_ids=inputs, position_ids=seg, use_cache=False).logits

    def step():
        logits = forward()
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="griffin-small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", default="griffon,hf,deepmind")
    p.add_argument("--json", help="write results here")


def run(args: argparse.Namespace) -> None:
    keep_freed_memory()  # as `griffon train` does; applies to all three implementations
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    ours, refs = reference_models(cfg)
    models = {"griffon": ours, **refs}
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    segment_pos = torch.arange(args.seq + 1).expand(args.batch, -1)
    n_tokens = args.batch * args.seq
    flops = train_flops_per_token(cfg, args.seq)

    peak = matmul_peak_flops()
    results = {
        "machine": machine(),
        "preset": args.preset,
        "params": ours.num_params(),
        "batch": args.batch,
        "seq": args.seq,
        "train_flops_per_token": flops,
        "fp32_matmul_peak_GFLOPs": peak / 1e9,
        "tokens_per_s": {},
    }
    print(f"{args.preset} ({ours.num_params() / 1e6:.2f}M params), batch {args.batch} x seq {args.seq}, fp32, "
          f"on {results['machine']['cpu']} ({results['machine']['threads']} threads)")  # fmt: skip
    print(f"  measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; model {flops / 1e6:.1f} MFLOP/token (train)")
    for name in args.impls.split(","):
        if name not in models:
            continue
        step = make_step(name, models[name].train(), tokens, segment_pos)
        t = best_time(step, args.repeats if name == "griffon" else max(1, args.repeats - 1))
        tps = n_tokens / t
        results["tokens_per_s"][name] = tps
        print(f"  {name:<9} {tps:8.0f} tokens/s   step {t:6.2f} s   MFU {flops * tps / peak:5.1%}")
    base = results["tokens_per_s"].get("griffon")
    for name, tps in results["tokens_per_s"].items():
        if name != "griffon" and base:
            results[f"speedup_vs_{name}"] = base / tps
            print(f"  griffon / {name}: {base / tps:.2f}x")
    if base:
        results["griffon_mfu"] = flops * base / peak
    if args.json:
        atomic_write_json(args.json, results)
