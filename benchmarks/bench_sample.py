"""Sampling throughput of Hawk, Griffin and the MQA transformer vs batch size and length.

    python benchmarks/bench_sample.py [--batches 1,8,64,256] [--lengths 128,512] [--json out.json --png out.png]

Three models of the same width and depth (so similar parameter counts; the printout gives
them): Griffin with a local window, Hawk, and an MQA transformer with global attention. For
each batch size and generation length it times greedy decoding after a short prompt (prefill
excluded), and reports tokens/s, milliseconds per decode step, the decode state held, and the
step time against its roofline bound: max((parameter bytes + batch x state bytes) / copy
bandwidth, 2 x parameters x batch / matmul peak), both measured in the same run. HF
``RecurrentGemmaForCausalLM.generate`` runs the Griffin configuration at the batch sizes given
by ``--hf-batches``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from griffon import Griffon, ModelConfig
from griffon.generate import _prefill, sample_next
from griffon.model import Cache

from common import copy_bandwidth, machine, matmul_peak_flops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def configs(width: int, layers: int, window: int) -> dict[str, ModelConfig]:
    base = dict(vocab_size=256, width=width, num_layers=layers, num_heads=4, num_kv_heads=1)
    return {
        "griffin": ModelConfig(**base, attention_window=window),
        "hawk": ModelConfig(**base, block_pattern=("recurrent",)),
        "mqa": ModelConfig(**base, block_pattern=("attention",), attention_window=None),
    }


@torch.inference_mode()
def time_decode(model: Griffon, batch: int, length: int, prompt_len: int = 16) -> tuple[float, int]:
    """Seconds for ``length`` greedy decode steps of ``batch`` rows, and the final cache bytes."""
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len))
    firsts = [_prefill(model, p.tolist(), 1024) for p in prompts[:1]] * batch  # same prompt: prefill once
    cache = Cache.stack([f[1] for f in firsts]) if batch > 1 else firsts[0][1]
    logits = torch.cat([f[0] for f in firsts])
    t0 = time.perf_counter()
    for _ in range(length):
        nxt = sample_next(logits, 0.0, None, None, None)
        logits, cache = model(nxt[:, None], cache=cache)
        logits = logits[:, -1]
    return time.perf_counter() - t0, cache.nbytes()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--lengths", default="128,512")
    p.add_argument("--hf-batches", default="1,8")
    p.add_argument("--json")
    p.add_argument("--png")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    bandwidth, peak = copy_bandwidth(), matmul_peak_flops()
    results: dict = {"machine": machine(), "copy_bandwidth_GBps": bandwidth / 1e9, "matmul_peak_GFLOPs": peak / 1e9,
                     "window": args.window, "runs": []}  # fmt: skip
    print(f"on {results['machine']['cpu']} ({results['machine']['threads']} threads): "
          f"{bandwidth / 1e9:.1f} GB/s copy, {peak / 1e9:.0f} GFLOP/s fp32 matmul")  # fmt: skip
    for name, cfg in configs(args.width, args.layers, args.window).items():
        torch.manual_seed(0)
        model = Griffon(cfg).eval()
        n = model.num_params()
        param_bytes = 4 * n
        for length in lengths:
            for batch in batches:
                time_decode(model, batch, 2)  # warm-up
                seconds, state = time_decode(model, batch, length)
                step = seconds / length
                bound = max((param_bytes + state) / bandwidth, 2 * n * batch / peak)
                run = {"model": name, "params": n, "batch": batch, "length": length, "tokens_per_s": batch * length / seconds,
                       "ms_per_step": 1e3 * step, "state_bytes": state, "step_vs_roofline": step / bound}  # fmt: skip
                results["runs"].append(run)
                print(f"  {name:<8} {n / 1e6:.2f}M  batch {batch:>4}  len {length:>5}: {run['tokens_per_s']:9.0f} tok/s  "
                      f"{run['ms_per_step']:7.2f} ms/step  state {state / 2**20:7.2f} MiB  {run['step_vs_roofline']:5.1f}x roofline")  # fmt: skip
    hf_runs(results, args, [int(b) for b in args.hf_batches.split(",") if b])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.png:
        plot(results, Path(args.png))


def hf_runs(results: dict, args, batches: list[int]) -> None:
    try:
        import oracles

        cfg = configs(args.width, args.layers, args.window)["griffin"]
        hf, ours = oracles.hf_pair(cfg.replace(attention_window=args.window + 1, window_semantics="hf"))
    except BaseException as e:  # pytest.skip is a BaseException
        print(f"  HF transformers unavailable: {e}")
        return
    length = min(int(x) for x in args.lengths.split(","))
    for batch in batches:
        prompt = torch.randint(0, 256, (batch, 16))
        with torch.inference_mode():
            hf.generate(prompt, max_new_tokens=2, do_sample=False)
            t0 = time.perf_counter()
            # min_new_tokens keeps HF's default EOS id (1) from ending a row early
            hf.generate(prompt, max_new_tokens=length, min_new_tokens=length, do_sample=False)
            seconds = time.perf_counter() - t0
        ours_s, _ = time_decode(ours, batch, length)
        run = {"model": "hf-griffin", "batch": batch, "length": length, "tokens_per_s": batch * length / seconds,
               "griffon_tokens_per_s": batch * length / ours_s}  # fmt: skip
        results["runs"].append(run)
        print(f"  HF generate (griffin) batch {batch:>4} len {length}: {run['tokens_per_s']:8.0f} tok/s "
              f"(prefill included) vs griffon {run['griffon_tokens_per_s']:8.0f} tok/s (decode only)")  # fmt: skip


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = sorted({r["length"] for r in results["runs"] if "params" in r})
    for name, color in [("griffin", "C0"), ("hawk", "C1"), ("mqa", "C2")]:
        for length, style in zip(lengths, ["--", "-", ":"], strict=False):
            rows = sorted(
                (r["batch"], r["tokens_per_s"]) for r in results["runs"] if r["model"] == name and r["length"] == length
            )
            if rows:
                ax.plot(
                    *zip(*rows, strict=True), style, color=color, marker="o", ms=3, label=f"{name}, {length} tokens"
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"greedy decoding, window {results['window']} (CPU, fp32)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
