"""GPU benchmark: the Triton scans against their memory bound and the public GPU scans, whole-model
bf16 training throughput (Griffin, Hawk, the MQA transformer), and sampling throughput vs batch.

    griffon bench gpu [--sections scan,conv,train,sample] [--quick] [--json out.json --png out.png]

* ``scan``: forward + backward of ``linear_scan_gpu`` and the fused RG-LRU (``rglru_scan_gpu``),
  float32 and bfloat16 streams, on shapes with B*D >= 64k channels and a long-T, small-B*D one.
  Achieved bandwidth is the minimum traffic (every input read once, every output written once)
  over the time, next to the copy bandwidth measured in the same run. The references, where
  installed (they are not dependencies): flash-linear-attention's ``fused_recurrent_hgrn`` and
  ``chunk_hgrn`` (``h = exp(g) h + x``, the plain scan without resets), ``accelerated-scan``
  (power-of-two T, no initial state), and griffon's portable ``loop`` backend.
* ``conv``: the Triton Conv1D against the PyTorch formulation, forward + backward.
* ``train``: tokens/s and MFU (model FLOPs from ``griffon.accounting`` over the bf16 matmul peak
  measured in the same run) of the ~400M presets (``griffin-400m``, ``hawk-400m``, ``mqa-400m``)
  under bf16 autocast with fused AdamW, at sequence lengths 2k, 8k and 32k with a fixed number of
  tokens per step. The transformer attends through SDPA's causal (FlashAttention) kernel; Griffin's
  local attention through FlexAttention.
* ``sample``: greedy decode tokens/s vs batch (1 to 512) after a short prompt, Griffin (CUDA-graph
  step) vs the MQA transformer (its cache grows, so the model's own step), as in the Griffin
  paper's Figure 4; out-of-memory is recorded as such.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from griffon.accounting import train_flops_per_token
from griffon.atomic import atomic_savefig, atomic_write_json
from griffon.decode.generate import prefill
from griffon.decode.steps import make_step
from griffon.machine import machine
from griffon.model import Cache, Griffon
from griffon.nn.rglru import MAX_SQRT_GRADIENT, RGLRU_C
from griffon.presets import get_preset

SCAN_SHAPES = [(8, 2048, 8192), (16, 4096, 4096), (1, 65536, 1024)]
SCAN_SHAPES_QUICK = [(8, 2048, 8192), (1, 32768, 1024)]
TRAIN_SEQS = [2048, 8192, 32768]
SAMPLE_BATCHES = [1, 8, 64, 256, 512]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sections", default="scan,conv,train,sample", help="comma-separated: scan,conv,train,sample")
    p.add_argument("--quick", action="store_true", help="fewer shapes and steps (a few minutes in all)")
    p.add_argument("--size", default="400m", help="preset size for train and sample (default 400m)")
    p.add_argument("--train-tokens", type=int, default=32768, help="tokens per training step")
    p.add_argument("--sample-length", type=int, default=1024, help="decode steps per sampling measurement")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot scan bandwidth, training tokens/s and sampling tokens/s here")


def cuda_time(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of ``fn`` on the GPU (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def gpu_peaks() -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, measured here."""
    src = torch.empty(2**30 // 4, device="cuda").normal_()
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / cuda_time(lambda: dst.copy_(src))
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * n**3 / cuda_time(lambda: a @ b)
    return {"copy_bandwidth_GBps": bandwidth / 1e9, "bf16_matmul_TFLOPs": flops / 1e12}


def min_traffic_bytes(kind: str, n: int, dtype: torch.dtype) -> int:
    """Bytes a forward + backward over n elements must move, each tensor touched once.

    ``scan``: forward reads a, x and writes h; backward reads dh, a and writes da, dx (7 stream
    tensors). ``rglru``: forward reads x and the two gates and writes y; backward reads dy, x and
    the gates and writes dx and the gates' gradients (11). Both read the float32 states for da:
    float32 streams reuse the output h (4 bytes read); other dtypes write and read a float32 copy (8).
    """
    size = torch.finfo(dtype).bits // 8
    streams = {"scan": 7, "rglru": 11}[kind]
    return n * (streams * size + (4 if dtype == torch.float32 else 8))


def _fwd_bwd(fn: Callable[[], tuple], grad_inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        out = fn()[0]
        torch.autograd.grad(out, grad_inputs, torch.ones_like(out))

    return run


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # the references are optional and may fail to import on a given stack
        print(f"  {module} unavailable: {type(e).__name__}: {e}")
        return None


def scan_cases(
    B: int, T: int, D: int, dtype: torch.dtype, fla, acc_scan, device: str = "cuda"
) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (a forward + backward on fresh (B, T, D) inputs, its minimum traffic in bytes)."""
    from griffon.scan import linear_scan
    from griffon.scan.gpu import linear_scan_gpu, rglru_scan_gpu

    n = B * T * D
    a = torch.rand(B, T, D, device=device).mul_(0.1).add_(0.9).to(dtype).requires_grad_()
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    zx, za = (torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    sp = torch.rand(D, device=device, requires_grad=True)
    plain, fused = (min_traffic_bytes(kind, n, dtype) for kind in ("scan", "rglru"))
    cases = {
        "griffon triton scan": (_fwd_bwd(lambda: linear_scan_gpu(a, x), [a, x]), plain),
        "griffon fused rglru": (
            _fwd_bwd(
                lambda: rglru_scan_gpu(x, zx, za, sp, c=RGLRU_C, max_sqrt_gradient=MAX_SQRT_GRADIENT), [x, zx, za, sp]
            ),
            fused,
        ),
    }
    if dtype == torch.float32 and T <= 4096:  # a Python loop over time: slow at long T
        cases["griffon loop (portable)"] = (_fwd_bwd(lambda: linear_scan(a, x, backend="loop"), [a, x]), plain)
    if fla is not None:
        g = a.detach().float().log().to(dtype).requires_grad_()  # FLA's gate is log a
        cases["fla fused_recurrent_hgrn"] = (_fwd_bwd(lambda: fla.fused_recurrent_hgrn(x, g), [x, g]), plain)
        cases["fla chunk_hgrn"] = (_fwd_bwd(lambda: fla.chunk_hgrn(x, g), [x, g]), plain)
    if acc_scan is not None and T & (T - 1) == 0:  # its layout is (B, D, T), T a power of two
        at, xt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (a, x))
        cases["accelerated-scan (triton)"] = (_fwd_bwd(lambda: (acc_scan.scan(at, xt),), [at, xt]), plain)
    return cases


def bench_scan(shapes, bandwidth: float) -> list[dict]:
    fla = _optional("fla.ops.hgrn")
    acc_scan = _optional("accelerated_scan.triton")
    rows = []
    for B, T, D in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for name, (fn, nbytes) in scan_cases(B, T, D, dtype, fla, acc_scan).items():
                try:
                    seconds = cuda_time(fn, warmup=2, repeats=5)
                except Exception as e:  # a reference that does not take this shape or dtype
                    print(f"  {name} {B}x{T}x{D} {dtype}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                achieved = nbytes / seconds
                rows.append(dict(kernel=name, shape=[B, T, D], dtype=str(dtype).removeprefix("torch."),
                                 ms=seconds * 1e3, GBps=achieved / 1e9, of_copy_bandwidth=achieved / bandwidth))  # fmt: skip
                print(f"  {name:28s} {B}x{T}x{D} {rows[-1]['dtype']:9s} {seconds * 1e3:8.3f} ms "
                      f"{achieved / 1e9:7.0f} GB/s ({achieved / bandwidth:.0%} of copy)")  # fmt: skip
            torch.cuda.empty_cache()
    return rows


def bench_conv(shapes) -> list[dict]:
    from griffon.nn.conv1d import CausalConv1D

    rows = []
    for B, T, D in shapes:
        conv = CausalConv1D(D, 4).cuda()
        x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        seg = torch.arange(T, device="cuda").expand(B, T)
        for name, triton in (("pytorch", False), ("triton", True)):
            fn = _fwd_bwd(lambda c=conv, x=x, seg=seg, t=triton: c(x, seg, triton=t), [x, conv.weight])
            seconds = cuda_time(fn)
            rows.append(dict(kernel=name, shape=[B, T, D], ms=seconds * 1e3))
            print(f"  conv1d {name:8s} {B}x{T}x{D} bf16 {seconds * 1e3:8.3f} ms")
    return rows


def _model(family: str, size: str, seq_len: int, device: str = "cuda") -> Griffon:
    cfg = get_preset(f"{family}-{size}")
    if family == "mqa":
        cfg = cfg.replace(max_seq_len=max(seq_len, cfg.max_seq_len or 0))
    model = Griffon(cfg).to(device)
    if family == "mqa":
        model.set_attention_kernel("sdpa-causal")  # FlashAttention; every row is one document here
    return model


def train_step(model: Griffon, opt: torch.optim.Optimizer, tokens: torch.Tensor) -> Callable[[], None]:
    """One bf16-autocast training step on tokens (B, T + 1): forward, cross-entropy, backward, AdamW."""

    def step() -> None:
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            logits, _ = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(size: str, seqs: list[int], tokens_per_step: int, steps: int, bf16_peak: float) -> list[dict]:
    rows = []
    for family in ("griffin", "hawk", "mqa"):
        for T in seqs:
            torch.cuda.empty_cache()
            model = _model(family, size, T)
            B = max(1, tokens_per_step // T)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            step = train_step(model, opt, torch.randint(0, model.config.vocab_size, (B, T + 1), device="cuda"))
            try:
                seconds = cuda_time(step, warmup=3, repeats=steps)
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(model=family, seq_len=T, batch=B, oom=True))
                print(f"  {family:8s} T={T:6d} B={B:3d}: out of memory")
                del model, opt, step
                continue
            tps = B * T / seconds
            mfu = train_flops_per_token(model.config, T) * tps / bf16_peak
            rows.append(dict(model=family, seq_len=T, batch=B, params=model.num_params(), tokens_per_s=tps, mfu=mfu))
            print(
                f"  {family:8s} T={T:6d} B={B:3d} {model.num_params() / 1e6:6.0f}M {tps:10.0f} tokens/s MFU {mfu:.1%}"
            )
            del model, opt, step
    return rows


SAMPLE_RUNS = (("griffin", "graph"), ("griffin", "model"), ("mqa", "model"))


@torch.inference_mode()
def bench_sample(size: str, batches: list[int], length: int, runs=SAMPLE_RUNS, device: str = "cuda") -> list[dict]:
    """Greedy decode tokens/s of each (family, decode step) in ``runs`` at each batch size."""
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for family, step_name in runs:
        model = _model(family, size, length + 64, device).eval().to(torch.bfloat16)
        prompt = torch.randint(0, model.config.vocab_size, (16,)).tolist()
        for B in batches:
            torch.cuda.empty_cache()
            try:
                logits, cache = prefill(model, [prompt])
                cache = Cache.stack([cache] * B)
                step = make_step(model, step_name)
                nxt = logits.argmax(-1).expand(B)
                for _ in range(3):  # warm-up (and the graph's capture)
                    nxt = step(nxt, cache).argmax(-1)
                sync()
                t0 = time.perf_counter()
                for _ in range(length):
                    nxt = step(nxt, cache).argmax(-1)
                sync()
                seconds = time.perf_counter() - t0
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(model=family, step=step_name, batch=B, length=length, oom=True))
                print(f"  {family:8s} {step_name:6s} B={B:4d}: out of memory")
                continue
            tps = B * length / seconds
            rows.append(dict(model=family, step=step_name, batch=B, length=length, tokens_per_s=tps,
                             cache_MB=cache.nbytes() / 2**20))  # fmt: skip
            print(f"  {family:8s} {step_name:6s} B={B:4d} {tps:10.0f} tokens/s  cache {cache.nbytes() / 2**20:8.1f} MB")
        del model
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    scan = [r for r in results.get("scan", []) if r["dtype"] == "float32"]
    labels = sorted({r["kernel"] for r in scan})
    shapes = sorted({tuple(r["shape"]) for r in scan})
    for i, k in enumerate(labels):
        vals = {tuple(r["shape"]): r["of_copy_bandwidth"] for r in scan if r["kernel"] == k}
        axes[0].bar([j + i / (len(labels) + 1) for j in range(len(shapes))], [vals.get(s, 0) for s in shapes],
                    width=1 / (len(labels) + 1), label=k)  # fmt: skip
    axes[0].set_xticks(range(len(shapes)), ["x".join(map(str, s)) for s in shapes], fontsize=7)
    axes[0].set_ylabel("fwd+bwd bandwidth / copy bandwidth (fp32)")
    axes[0].legend(fontsize=7)
    for fam in ("griffin", "hawk", "mqa"):
        pts = [
            (r["seq_len"], r["tokens_per_s"]) for r in results.get("train", []) if r["model"] == fam and "oom" not in r
        ]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), marker="o", label=fam)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("sequence length")
    axes[1].set_ylabel("training tokens/s (bf16)")
    axes[1].legend()
    for fam, step in (("griffin", "graph"), ("griffin", "model"), ("mqa", "model")):
        pts = [(r["batch"], r["tokens_per_s"]) for r in results.get("sample", [])
               if r["model"] == fam and r["step"] == step and "oom" not in r]  # fmt: skip
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=f"{fam} ({step} step)")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("batch")
    axes[2].set_ylabel("decode tokens/s")
    axes[2].legend()
    fig.suptitle(f"griffon on {results['machine']['cuda']}")
    fig.tight_layout()
    atomic_savefig(fig, path)


def run(args: argparse.Namespace) -> dict:
    """Run the sections named in ``args`` (see :func:`add_arguments`); print and return the results."""
    if not torch.cuda.is_available():
        raise SystemExit("griffon bench gpu needs a CUDA GPU")
    sections = set(args.sections.split(","))
    unknown = sections - {"scan", "conv", "train", "sample"}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; known: scan, conv, train, sample")
    results: dict = {"machine": machine(), **gpu_peaks()}
    print(f"{results['machine']['cuda']}: copy {results['copy_bandwidth_GBps']:.0f} GB/s, "
          f"bf16 matmul {results['bf16_matmul_TFLOPs']:.0f} TFLOP/s")  # fmt: skip
    shapes = SCAN_SHAPES_QUICK if args.quick else SCAN_SHAPES
    if "scan" in sections:
        print("scan, forward + backward:")
        results["scan"] = bench_scan(shapes, results["copy_bandwidth_GBps"] * 1e9)
    if "conv" in sections:
        print("conv1d, forward + backward:")
        results["conv"] = bench_conv(shapes[:1])
    if "train" in sections:
        print(f"training, bf16 autocast, {args.train_tokens} tokens/step:")
        seqs = TRAIN_SEQS[:2] if args.quick else TRAIN_SEQS
        results["train"] = bench_train(args.size, seqs, args.train_tokens, 3 if args.quick else 6,
                                       results["bf16_matmul_TFLOPs"] * 1e12)  # fmt: skip
    if "sample" in sections:
        print(f"sampling, {args.sample_length} steps after a 16-token prompt:")
        batches = SAMPLE_BATCHES[::2] if args.quick else SAMPLE_BATCHES
        results["sample"] = bench_sample(args.size, batches, args.sample_length // (4 if args.quick else 1))
    if args.json:
        atomic_write_json(args.json, results)
    if args.png:
        plot(results, Path(args.png))
    return results
