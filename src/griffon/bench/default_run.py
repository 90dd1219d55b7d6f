"""Training throughput of the default run (`griffon train` defaults) in fp32 and bf16, with MFU.

    griffon bench default-run [--steps 5] [--json out.json]

Times optimizer steps of the default model and batch on the embedded corpus (after one warm-up
step) under each precision, and divides the model's training FLOPs by the matmul throughput of
the same dtype measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch

from griffon.accounting import train_flops_per_token
from griffon.allocator import keep_freed_memory
from griffon.atomic import atomic_write_json
from griffon.bench.timing import matmul_peak_flops
from griffon.data.loader import PackedLoader, TokenSplit
from griffon.data.training_data import TrainingData
from griffon.machine import machine
from griffon.model import Griffon
from griffon.run import Run
from griffon.train.config import TrainConfig
from griffon.train.losses import next_token_loss
from griffon.train.optim import make_optimizer
from griffon.train.parallelize import cpu_has_native_bf16
from griffon.train.trainer import prepare_data


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16-steps", type=int, default=2, help="bf16 can be 100x slower on CPUs without bf16 matmuls")
    p.add_argument("--json")


def run(args: argparse.Namespace) -> None:
    keep_freed_memory()
    cfg = TrainConfig()
    data = TrainingData.resolve(cfg.data.path)
    data.check(cfg.data.tokenizer, cfg.model.vocab_size, cfg.data.verify)
    data_dir = prepare_data(cfg, data, Run(tempfile.mkdtemp()).data, is_main=True)
    split = TokenSplit.open(data_dir, "train")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops = train_flops_per_token(cfg.model, cfg.data.seq_len)
    results = {"machine": machine(), "native_bf16_matmul": cpu_has_native_bf16(), "model": cfg.model.to_dict(),
               "batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "train_flops_per_token": flops}  # fmt: skip
    fp32_peak = matmul_peak_flops(torch.float32)
    for name, dtype, steps in [("fp32", None, args.steps), ("bf16", torch.bfloat16, args.bf16_steps)]:
        own_peak = fp32_peak if dtype is None else matmul_peak_flops(dtype, n=512)
        peak = max(fp32_peak, own_peak)
        torch.manual_seed(0)
        model = Griffon(cfg.model)
        opt = make_optimizer(model, cfg.optim)
        loader = PackedLoader(split, cfg.data.seq_len, cfg.data.batch_size)

        def step(model=model, opt=opt, loader=loader, dtype=dtype):
            tokens, seg = next(loader)
            ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            with ctx:
                logits, _ = model(tokens[:, :-1], seg[:, :-1])
            next_token_loss(logits, tokens[:, 1:])[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        tps = steps * tokens_per_step / (time.perf_counter() - t0)
        results[name] = {"tokens_per_s": tps, "own_matmul_GFLOPs": own_peak / 1e9, "peak_GFLOPs": peak / 1e9,
                         "mfu": flops * tps / peak}  # fmt: skip
        print(f"{name}: {tps:8.0f} tokens/s, MFU {flops * tps / peak:6.1%} of {peak / 1e9:.0f} GFLOP/s "
              f"({name} matmul alone: {own_peak / 1e9:.1f} GFLOP/s)")  # fmt: skip
    print(f"on {results['machine']['cpu']}, {results['machine']['threads']} threads; native bf16 matmul: "
          f"{results['native_bf16_matmul']}")  # fmt: skip
    if args.json:
        atomic_write_json(args.json, results)
