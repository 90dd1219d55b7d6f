"""Sampling throughput of Hawk, Griffin and the MQA transformer vs batch size and length.

    griffon bench sample [--batches 1,8,64,256] [--lengths 128,512] [--json out.json --png out.png]

Three models of the same width and depth (so similar parameter counts; the printout gives
them): Griffin with a local window, Hawk, and an MQA transformer with global attention. For
each batch size and generation length it times greedy decoding after a short prompt (prefill
excluded), and reports tokens/s, milliseconds per decode step, the decode state held, and the
step time against its roofline bound: max((parameter bytes + batch x state bytes) / copy
bandwidth, 2 x parameters x batch / matmul peak), both measured in the same run. HF
``RecurrentGemmaForCausalLM.generate`` runs the Griffin configuration at the batch sizes given
by ``--hf-batches``. With ``--compile`` it also times the ``torch.compile``'d step
(``generate(..., step="compiled")``) beside the default one; the goals then take the faster of the two.
The goals are arguments: the largest Griffin step time over its roofline at batch >= 16
(``--goal-roofline``), and the smallest speedup over HF ``generate`` (``--goal-vs-hf``); the
Griffin-vs-MQA check asks for Griffin to be at least as fast at batch >= 64 and lengths >= 4 windows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from griffon.atomic import atomic_savefig, atomic_write_json
from griffon.bench.timing import copy_bandwidth, matmul_peak_flops
from griffon.config import ModelConfig
from griffon.decode.fused import FusedDecoder
from griffon.decode.generate import prefill
from griffon.decode.steps import make_step
from griffon.machine import machine
from griffon.model import Cache, Griffon
from griffon.nn.structured import StructuredLinear


def configs(width: int, layers: int, window: int) -> dict[str, ModelConfig]:
    base = dict(vocab_size=256, width=width, num_layers=layers, num_heads=4, num_kv_heads=1)
    return {
        "griffin": ModelConfig(**base, attention_window=window),
        "hawk": ModelConfig(**base, block_pattern=("recurrent",)),
        "mqa": ModelConfig(**base, block_pattern=("attention",), attention_window=None),
    }


@torch.inference_mode()
def time_decode(model: Griffon, batch: int, length: int, prompt_len: int = 16, step: str = "auto") -> tuple[float, int]:
    """Seconds for ``length`` greedy decode steps of ``batch`` rows by the decode step named
    ``step`` (:func:`~griffon.decode.steps.make_step`), and the final cache bytes."""
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()
    logits, cache = prefill(model, [prompt])  # one row, copied: the prefill is not timed
    if batch > 1:
        cache, logits = Cache.stack([cache] * batch), logits.expand(batch, -1)
    decode_step = make_step(model, step)
    t0 = time.perf_counter()
    for _ in range(length):
        logits = decode_step(logits.argmax(-1), cache)  # greedy
    return time.perf_counter() - t0, cache.nbytes()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--window", type=int, default=128, help="Griffin's local attention window")
    p.add_argument("--batches", default="1,8,64,256", help="comma-separated batch sizes")
    p.add_argument("--lengths", default="128,512", help="comma-separated generation lengths")
    p.add_argument("--hf-batches", default="1,16", help="batch sizes for HF generate ('' to skip)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step (compiles per batch)")
    p.add_argument("--goal-roofline", type=float, default=2.0,
                   help="goal: Griffin's step at batch >= 16 within this factor of its roofline")  # fmt: skip
    p.add_argument(
        "--goal-vs-hf", type=float, default=3.0, help="goal: at least this many times HF generate's tokens/s"
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot tokens/s vs batch size here")


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); print and return the results."""
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
        # one model's compiled steps (one per batch size) at a time, within dynamo's recompile limit
        torch._dynamo.reset()
        n = model.num_params()
        param_bytes = 4 * n
        floors = {batch: matmul_seconds(model, batch) for batch in batches}
        # the model's own (unfused) step, for comparison: 64 steps after the prompt
        plain = {batch: time_decode(model, batch, 64, step="model")[0] / 64 for batch in batches}
        for length in lengths:
            for batch in batches:
                time_decode(model, batch, 2)  # warm-up
                seconds, state = time_decode(model, batch, length)
                step = seconds / length
                bound = max((param_bytes + state) / bandwidth, 2 * n * batch / peak)
                run = {"model": name, "params": n, "batch": batch, "length": length, "tokens_per_s": batch * length / seconds,
                       "ms_per_step": 1e3 * step, "state_bytes": state, "roofline_ms": 1e3 * bound, "step_vs_roofline": step / bound,
                       "matmuls_ms": 1e3 * floors[batch], "model_step_ms": 1e3 * plain[batch]}  # fmt: skip
                results["runs"].append(run)
                compiled = ""
                if args.compile:
                    time_decode(model, batch, 2, step="compiled")  # compiles, once per batch size
                    step = time_decode(model, batch, length, step="compiled")[0] / length
                    run.update(compiled_ms_per_step=1e3 * step, compiled_step_vs_roofline=step / bound)
                    compiled = (
                        f", compiled {run['compiled_ms_per_step']:6.2f} ({run['compiled_step_vs_roofline']:4.1f}x)"
                    )
                print(f"  {name:<8} {n / 1e6:.2f}M  batch {batch:>4}  len {length:>5}: {run['tokens_per_s']:9.0f} tok/s  "
                      f"{run['ms_per_step']:7.2f} ms/step (model's step {run['model_step_ms']:6.2f}, "
                      f"matmuls alone {run['matmuls_ms']:6.2f}{compiled})  "
                      f"state {state / 2**20:7.2f} MiB  {run['step_vs_roofline']:5.1f}x roofline")  # fmt: skip
    hf_runs(results, args, [int(b) for b in args.hf_batches.split(",") if b])
    results["goals"] = goals(results, args.window, args.goal_roofline, args.goal_vs_hf)
    if args.json:
        atomic_write_json(args.json, results)
    if args.png:
        plot(results, Path(args.png))
    return results


@torch.inference_mode()
def matmul_seconds(model: Griffon, batch: int, repeats: int = 20) -> float:
    """Time of one pass over every weight matrix of a decode step at ``batch`` rows, on their own
    (the small block-diagonal gates left out): the floor that PyTorch's matmuls set for a step,
    whatever happens around them. The matrices are those of the step generation runs: the fused
    step's merged ones where it covers the model, else the model's layers and its tied head."""
    if FusedDecoder.reason(model) is None:
        mats = FusedDecoder(model).matrices()
        inputs = {w.shape[0]: torch.randn(batch, w.shape[0]) for w in mats}

        def step() -> None:
            for w in mats:
                torch.mm(inputs[w.shape[0]], w)

    else:
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, StructuredLinear))]
        inputs = {m.in_features: torch.randn(batch, m.in_features) for m in layers}
        x = torch.randn(batch, model.config.width)

        def step() -> None:
            for m in layers:
                m(inputs[m.in_features])
            torch.nn.functional.linear(x, model.embed.weight)

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_ms(run: dict) -> float:
    """Milliseconds per step of the faster step timed in ``run`` (default or compiled)."""
    return min(run["ms_per_step"], run.get("compiled_ms_per_step", float("inf")))


def goals(results: dict, window: int, roofline_factor: float = 2.0, hf_speedup: float = 3.0) -> dict:
    """The goals (see the module's doc), checked against this run's figures and printed. Where the
    compiled step was timed too, each figure is the faster of the two steps."""
    runs = [r for r in results["runs"] if "params" in r]
    griffin = [r for r in runs if r["model"] == "griffin" and r["batch"] >= 16]
    out: dict = {}
    if griffin:
        worst = max(griffin, key=lambda r: _best_ms(r) / r["roofline_ms"])
        ratio = _best_ms(worst) / worst["roofline_ms"]
        out["griffin_step_vs_roofline_batch_ge_16"] = {"worst": ratio, "batch": worst["batch"],
                                                      "goal": roofline_factor, "met": ratio <= roofline_factor}  # fmt: skip
    hf = {
        r["batch"]: max(r["griffon_tokens_per_s"], r.get("griffon_compiled_tokens_per_s", 0.0)) / r["tokens_per_s"]
        for r in results["runs"]
        if r["model"] == "hf-griffin"
    }
    if hf:
        out["griffon_vs_hf_generate"] = {"ratios": hf, "goal": hf_speedup, "met": min(hf.values()) >= hf_speedup}
    pairs = []
    for r in runs:
        if r["model"] == "griffin" and r["batch"] >= 64 and r["length"] >= 4 * window:
            mqa = [m for m in runs if m["model"] == "mqa" and (m["batch"], m["length"]) == (r["batch"], r["length"])]
            pairs += [(r["batch"], r["length"], _best_ms(m) / _best_ms(r)) for m in mqa]
    if pairs:
        out["griffin_vs_mqa_batch_ge_64_len_ge_4x_window"] = {"ratios": pairs, "met": min(p[2] for p in pairs) >= 1.0}
    for name, goal in out.items():
        print(
            f"  goal {name}: {'met' if goal['met'] else 'NOT met'} ({ {k: v for k, v in goal.items() if k != 'met'} })"
        )
    return out


def hf_model(model: Griffon):
    """HF ``RecurrentGemmaForCausalLM`` holding ``model``'s weights (needs ``transformers``)."""
    import transformers

    from griffon.checkpoint.convert import hf_transformers_config, to_hf_state_dict

    hf = transformers.RecurrentGemmaForCausalLM(hf_transformers_config(model.config)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embedding
        raise RuntimeError(f"HF weights do not line up: missing {missing}, unexpected {unexpected}")
    return hf


def hf_runs(results: dict, args, batches: list[int]) -> None:
    if not batches:
        return
    cfg = configs(args.width, args.layers, args.window)["griffin"]
    # HF counts the window including the query itself: window + 1 there sees what window does here.
    torch.manual_seed(0)
    ours = Griffon(cfg.replace(attention_window=args.window + 1, window_semantics="hf")).eval()
    try:
        hf = hf_model(ours)
    except ImportError as e:
        print(f"  HF transformers unavailable ({e}); pip install transformers to compare")
        return
    length = min(int(x) for x in args.lengths.split(","))
    torch._dynamo.reset()
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
        compiled = ""
        if args.compile:
            time_decode(ours, batch, 2, step="compiled")
            run["griffon_compiled_tokens_per_s"] = batch * length / time_decode(ours, batch, length, step="compiled")[0]
            compiled = f", compiled {run['griffon_compiled_tokens_per_s']:8.0f}"
        results["runs"].append(run)
        print(f"  HF generate (griffin) batch {batch:>4} len {length}: {run['tokens_per_s']:8.0f} tok/s "
              f"(prefill included) vs griffon {run['griffon_tokens_per_s']:8.0f} tok/s{compiled} (decode only)")  # fmt: skip


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = sorted({r["length"] for r in results["runs"] if "params" in r})
    for name, color in [("griffin", "C0"), ("hawk", "C1"), ("mqa", "C2")]:
        for length, style in zip(lengths, ["--", "-", ":"], strict=False):
            runs = sorted((r for r in results["runs"] if r["model"] == name and r["length"] == length),
                          key=lambda r: r["batch"])  # fmt: skip
            if runs:
                batches = [r["batch"] for r in runs]
                ax.plot(batches, [r["tokens_per_s"] for r in runs], style, color=color, marker="o", ms=3,
                        label=f"{name}, {length} tokens")  # fmt: skip
            if runs and length == lengths[-1] and all("compiled_ms_per_step" in r for r in runs):
                ax.plot(batches, [1e3 * r["batch"] / r["compiled_ms_per_step"] for r in runs], style, color=color,
                        marker="x", ms=5, lw=0.8, alpha=0.6, label=f"{name}, {length} tokens, compiled")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"greedy decoding, window {results['window']} (CPU, fp32)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
