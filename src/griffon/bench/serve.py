"""Load benchmark of ``griffon serve``: an async HTTP client on loopback, as vLLM's serving benchmark.

    griffon bench serve [--preset griffin-20m] [--requests 64] [--rates 2,8,inf] [--json out.json --png out.png]
    griffon bench serve --experiments offline,models,prefix --json docs/results/serving_cpu.json

Requests arrive as a Poisson process (``--arrival poisson``) or at fixed intervals at each rate in
``--rates`` (``inf``: all at once, the server saturated); prompt and output lengths are drawn
uniformly from ``--prompt-len`` and ``--output-len`` (``lo:hi``); a ``--shared-prefix`` fraction of
prompts starts with the same ``--prefix-len`` tokens. Prompts are random token ids and outputs run
to their length (``ignore_eos``). Reported per rate: request throughput, output tokens/s, and
time to first token (TTFT), time per output token after the first (TPOT), inter-token latency
(ITL, between streamed events) and end-to-end latency (mean, p50, p99). The server runs in this
process on 127.0.0.1 with a random-weight model of ``--preset``, or at ``--url``, which must be a
loopback address. Every run is bounded: ``--requests`` requests and ``--timeout`` seconds each.

``--experiments`` runs comparisons in one process instead:

* ``offline``: the saturated server against offline :func:`griffon.generate` on the same prompts
  at the same batch (output tokens/s);
* ``models``: Griffin against the MQA transformer of the same width and depth at long prompts and
  outputs (requests/s), where the transformer's cache grows with every token;
* ``prefix``: TTFT of requests sharing a long system prompt, the prefix-state cache on and off.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

from griffon.atomic import atomic_savefig, atomic_write_json
from griffon.config import ModelConfig
from griffon.machine import machine
from griffon.model import Griffon


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a running server (loopback only); default: one started here")
    p.add_argument("--preset", default="griffin-20m", help="model of the server started here (random weights)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--requests", type=int, default=48, help="requests per rate")
    p.add_argument("--rates", default="2,8,inf", help="comma-separated request rates (per second; inf: all at once)")
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    p.add_argument("--prompt-len", default="32:256", help="lo:hi prompt tokens")
    p.add_argument("--output-len", default="16:64", help="lo:hi output tokens")
    p.add_argument("--shared-prefix", type=float, default=0.0, help="fraction of prompts that share a prefix")
    p.add_argument("--prefix-len", type=int, default=512, help="tokens of the shared prefix")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a request is abandoned")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiments", help="comma-separated: offline,models,prefix (see the module docstring)")
    p.add_argument(
        "--client-cpus",
        help="offline experiment: comma-separated CPUs for the load generator; the "
        "server and offline generate get the others",
    )
    p.add_argument("--repeats", type=int, default=3, help="offline experiment: interleaved runs (medians reported)")
    p.add_argument("--engine", default=None,
                   help="the server's engine: process or thread (the offline experiment: both, or a "
                        "comma-separated list; default process,thread there, process elsewhere)")  # fmt: skip
    p.add_argument("--long", default="4096:1024", help="models experiment: prompt:output tokens (default 4096:1024)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot latency against load here")


def _span(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(":"))
    if not 1 <= lo <= hi:
        raise SystemExit(f"expected lo:hi with 1 <= lo <= hi, got {text!r}")
    return lo, hi


def make_workload(n: int, vocab: int, prompt_len, output_len, shared: float, prefix_len: int, seed: int):
    """``n`` (prompt token ids, output tokens) pairs."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(prefix_len)]
    out = []
    for _ in range(n):
        body = [rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))]
        out.append(((prefix + body) if rng.random() < shared else body, rng.randint(*output_len)))
    return out


async def _one(session, url: str, prompt: list[int], max_tokens: int, stream: bool) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream, "ignore_eos": True}
    t0 = time.perf_counter()
    events, first = [], None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                return {"ok": False, "status": r.status}
            if not stream:  # one answer at the end: only end-to-end latency
                await r.read()
            else:
                # Raw chunks, events counted without parsing: the load generator shares the
                # machine, so it does as little as it can per token.
                async for chunk in r.content.iter_any():
                    now = time.perf_counter()
                    count = chunk.count(b"data: {")
                    if count and first is None:  # the server sends an event per new token
                        first = now
                    events += [now] * count
    except Exception as e:  # a failed request is counted, not fatal
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    first = first or end
    gaps = [b - a for a, b in zip(events, events[1:], strict=False)]
    return {"ok": True, "ttft": first - t0, "e2e": end - t0, "output_tokens": max_tokens,
            "tpot": (end - first) / (max_tokens - 1) if max_tokens > 1 and stream else None, "itl": gaps}  # fmt: skip


async def run_load(
    url: str, workload, rate: float, arrival: str, timeout: float, seed: int, stream: bool = True
) -> dict:
    """Send the workload at ``rate`` requests/s (streamed, or answered whole); the latency and
    throughput summary."""
    # aiohttp, as vLLM's serving benchmark: on this 2-core box the client shares the server's
    # cores, and it reads a token stream with under half of httpx's CPU time.
    import aiohttp

    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=len(workload) + 4)
    per_request = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=per_request) as client:
        tasks = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        for prompt, max_tokens in workload:
            tasks.append(asyncio.create_task(_one(client, url, prompt, max_tokens, stream)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate)
        done = await asyncio.gather(*tasks)
        duration, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # The load generator's own CPU time, as a share of one core: what it took from the server.
    return summarise(done, duration, rate) | {"client_cpu_share": cpu / duration}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"mean": statistics.fmean(values), "p50": q(0.5), "p99": q(0.99)}


def summarise(results: list[dict], duration: float, rate: float) -> dict:
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["output_tokens"] for r in ok)
    return {
        "rate": rate if math.isfinite(rate) else "inf",
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": tokens / duration,
        "ttft_s": _stats([r["ttft"] for r in ok]),
        "tpot_s": _stats([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_s": _stats([g for r in ok for g in r["itl"]]),
        "e2e_s": _stats([r["e2e"] for r in ok]),
    }


def _print(label: str, s: dict) -> None:
    ms = lambda d: "-" if d["p50"] is None else f"{1e3 * d['mean']:.0f}/{1e3 * d['p50']:.0f}/{1e3 * d['p99']:.0f}"  # noqa: E731
    print(f"  {label:<24} {s['completed']:>3}/{s['requests']} ok  {s['request_throughput']:6.2f} req/s  "
          f"{s['output_tokens_per_s']:7.1f} tok/s  TTFT {ms(s['ttft_s'])}  TPOT {ms(s['tpot_s'])}  "
          f"ITL {ms(s['itl_s'])}  E2E {ms(s['e2e_s'])} ms (mean/p50/p99)")  # fmt: skip


ENGINES = ("process", "thread")


def bench_engine(config: dict, max_batch: int, prefix_cache: bool):
    """The benchmark's engine: the random-weight model of ``config`` (picklable: an engine process builds it)."""
    from griffon.engine import Engine

    return Engine(_model(ModelConfig.from_dict(config)), None, max_batch=max_batch, max_queue=100_000,
                  prefix_cache_bytes=(256 * 2**20) if prefix_cache else 0)  # fmt: skip


def _server_main(
    config: dict, max_batch: int, prefix_cache: bool, cpus: list[int] | None, engine_kind: str, conn
) -> None:
    """A server process: the random-weight model of ``config`` behind ``griffon serve``'s app, its
    engine on a thread or in a process of its own (``engine_kind``), on ``cpus`` (with one torch
    thread each) if given."""
    import functools

    from griffon.engine.client import InprocClient
    from griffon.engine.process import EngineProcess
    from griffon.serve.server import BackgroundServer, create_app

    if cpus:
        pin(cpus)
    build = functools.partial(bench_engine, config, max_batch, prefix_cache)
    client = InprocClient(build()) if engine_kind == "thread" else EngineProcess(build, None)
    with BackgroundServer(create_app(client, "bench")) as url:
        conn.send((url, [os.getpid()] + ([client.pid] if engine_kind == "process" else [])))
        conn.recv()  # until the benchmark is done with it
        conn.send({"prefix_hits": client.prefix_stats()[1]})


class ServerProcess:
    """``with ServerProcess(cfg, ...) as url``: a server in its own process on loopback, so the load
    generator's Python does not share the server's interpreter (as a remote client would not); its
    engine on a thread of it or in a process of its own (``engine``: :data:`ENGINES`)."""

    def __init__(
        self, cfg: ModelConfig, max_batch: int, prefix_cache: bool, cpus: list[int] | None = None,
        engine: str = "process",
    ) -> None:  # fmt: skip
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        args = (cfg.to_dict(), max_batch, prefix_cache, cpus, engine, child)
        self._process = ctx.Process(target=_server_main, args=args)
        self._pids: list[int] = []
        self.stats: dict = {}

    def pids(self) -> list[int]:
        """The server's process and its engine's, if that has its own."""
        return list(self._pids)

    def cpu_seconds(self) -> float:
        """CPU time the server's processes have used so far (user + system, all their threads)."""
        total = 0.0
        for pid in self._pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def __enter__(self) -> str:
        self._process.start()
        if not self._conn.poll(300):
            self._process.kill()
            raise RuntimeError("the benchmark's server did not start within 300 s")
        url, self._pids = self._conn.recv()
        return url

    def __exit__(self, *exc) -> None:
        self._conn.send("stop")
        if self._conn.poll(60):
            self.stats = self._conn.recv()
        self._process.join(60)
        if self._process.is_alive():
            self._process.kill()


def pin(cpus: list[int]) -> None:
    """Run this process on ``cpus`` only, every thread of it (``sched_setaffinity(0)`` would move
    the calling thread alone, leaving torch's workers where they were), with one torch thread each."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that has just ended
            pass
    torch.set_num_threads(len(cpus))


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"griffon bench serve sends load to loopback addresses only, not {host!r}")


def _model(cfg: ModelConfig) -> Griffon:
    torch.manual_seed(0)
    return Griffon(cfg).eval()


def experiment_offline(
    base: ModelConfig, batch: int, prompt_len: int, output_len: int, seed: int, repeats: int = 3,
    client_cpus: list[int] | None = None, engines: tuple[str, ...] = ENGINES,
) -> dict:  # fmt: skip
    """Saturated server vs offline generate, same prompts, same batch (every request admitted at
    once): answers returned whole and streamed token by token, by a server of each kind of
    ``engines`` (its engine in a process of its own, or on a thread of the server's); ``repeats``
    interleaved runs, each server's ratio to the offline figure of its own run, the median over
    runs reported (and the best run's figures); the load generator's and the server's CPU time as
    shares of one core. With ``client_cpus``, the load generator runs on those CPUs and the
    servers, offline ``generate`` and the engine alone on the others (one torch thread a CPU), so
    that the two do not share a core."""
    import contextlib

    from griffon.decode.generate import generate
    from griffon.engine import Engine, SamplingParams

    everything, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    server_cpus = None
    if client_cpus:
        server_cpus = [c for c in everything if c not in client_cpus]
        if not server_cpus or not set(client_cpus) <= set(everything):
            raise SystemExit(f"--client-cpus {client_cpus} must be some, not all, of this machine's CPUs {everything}")

    def on_server_cpus() -> None:  # offline generate and the engine alone run where the server does
        if server_cpus:
            pin(server_cpus)

    def on_client_cpus() -> None:
        if client_cpus:
            pin(client_cpus)

    model = _model(base)
    workload = [(p, output_len) for p, _ in make_workload(batch, base.vocab_size, (prompt_len, prompt_len),
                                                          (1, 1), 0.0, 0, seed)]  # fmt: skip
    prompts = [p for p, _ in workload]
    on_server_cpus()
    generate(model, prompts[:2], 4, temperature=0.0)  # warm-up
    offline, engine_alone = [], []
    runs: dict[str, list[dict]] = {f"{e} {k}": [] for e in engines for k in ("whole", "streamed")}
    with contextlib.ExitStack() as stack:
        servers = {e: ServerProcess(base, batch, prefix_cache=False, cpus=server_cpus, engine=e) for e in engines}
        urls = {e: stack.enter_context(server) for e, server in servers.items()}
        on_client_cpus()
        for url in urls.values():
            asyncio.run(run_load(url, workload[:2], math.inf, "fixed", 600, seed))  # warm-up
        for _ in range(repeats):  # interleaved: the machine's drift hits all alike
            on_server_cpus()
            t0 = time.perf_counter()
            generate(model, prompts, output_len, temperature=0.0)
            offline.append(batch * output_len / (time.perf_counter() - t0))
            engine = Engine(model, None, max_batch=batch, prefix_cache_bytes=0)  # the engine alone, no HTTP
            t0 = time.perf_counter()
            for p in prompts:
                engine.submit(p, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
            engine.run_until_done()
            engine_alone.append(batch * output_len / (time.perf_counter() - t0))
            on_client_cpus()
            for e, server in servers.items():
                for kind in ("whole", "streamed"):
                    cpu0 = server.cpu_seconds()
                    s = asyncio.run(
                        run_load(urls[e], workload, math.inf, "fixed", 600, seed, stream=kind == "streamed")
                    )
                    s["server_cpu_share"] = (server.cpu_seconds() - cpu0) / s["duration_s"]
                    s["over_offline"] = s["output_tokens_per_s"] / offline[-1]
                    runs[f"{e} {kind}"].append(s)
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), everything)
    torch.set_num_threads(threads)
    ratios = {k: statistics.median(s["over_offline"] for s in rs) for k, rs in runs.items()}
    best = {k: max(rs, key=lambda s: s["output_tokens_per_s"]) for k, rs in runs.items()}
    print(
        f"  batch {batch}, prompts {prompt_len}, outputs {output_len}, {repeats} runs"
        + (f", client on CPUs {client_cpus}, server on {server_cpus}" if client_cpus else "")
        + f": offline generate {statistics.median(offline):7.1f} tok/s (median); engine alone "
        + f"{statistics.median(e / o for e, o in zip(engine_alone, offline, strict=True)):.0%}"
    )
    for k, rs in runs.items():
        print(
            f"  server, engine {k:<18} {ratios[k]:4.0%} of offline (median; runs "
            + ", ".join(f"{s['over_offline']:.0%}" for s in rs)
            + f"); CPU: load generator {statistics.median(s['client_cpu_share'] for s in rs):.0%}, "
            + f"server {statistics.median(s['server_cpu_share'] for s in rs):.0%} of a core"
        )
    return {"batch": batch, "prompt_len": prompt_len, "output_len": output_len, "repeats": repeats,
            "offline_tokens_per_s": offline, "engine_tokens_per_s": engine_alone, "server": best, "runs": runs,
            "server_over_offline": ratios, "client_cpus": client_cpus, "server_cpus": server_cpus}  # fmt: skip


def experiment_models(base: ModelConfig, n: int, max_batch: int, prompt_len: int, output_len: int, seed: int) -> dict:
    """Griffin vs the MQA transformer of the same width and depth at long prompts and outputs."""
    configs = {
        "griffin": base,
        "mqa": base.replace(
            block_pattern=("attention",), attention_window=None, max_seq_len=prompt_len + output_len + 8
        ),  # fmt: skip
    }
    out = {}
    for name, cfg in configs.items():
        params = _model(cfg).num_params()
        workload = make_workload(n, cfg.vocab_size, (prompt_len, prompt_len), (output_len, output_len), 0.0, 0, seed)
        with ServerProcess(cfg, max_batch, prefix_cache=False) as url:
            asyncio.run(run_load(url, workload[:1], math.inf, "fixed", 1800, seed))  # warm-up
            s = asyncio.run(run_load(url, workload, math.inf, "fixed", 1800, seed))
        out[name] = s | {"params": params}
        _print(f"{name} ({params / 1e6:.1f}M)", s)
    out["griffin_over_mqa_requests"] = out["griffin"]["request_throughput"] / out["mqa"]["request_throughput"]
    print(f"  Griffin / MQA requests/s: {out['griffin_over_mqa_requests']:.2f}x")
    return out | {"prompt_len": prompt_len, "output_len": output_len, "requests": n, "max_batch": max_batch}


def experiment_prefix(base: ModelConfig, n: int, prefix_len: int, seed: int) -> dict:
    """TTFT of requests that share a ``prefix_len``-token system prompt, one at a time, cache on and off."""
    workload = make_workload(n, base.vocab_size, (16, 16), (4, 4), 1.0, prefix_len, seed)
    out = {}
    for label, cache in (("cache off", False), ("cache on", True)):
        server = ServerProcess(base, 8, prefix_cache=cache)
        with server as url:
            asyncio.run(run_load(url, workload[:1], math.inf, "fixed", 600, seed))  # warm-up (fills the cache)
            runs = [asyncio.run(run_load(url, [w], math.inf, "fixed", 600, seed)) for w in workload[1:]]
        ttft = [r["ttft_s"]["p50"] for r in runs]
        out[label] = {"ttft_s": _stats(ttft), "prefix_hits": server.stats.get("prefix_hits")}
        print(f"  {label:<10} TTFT p50 {1e3 * out[label]['ttft_s']['p50']:8.1f} ms  "
              f"p99 {1e3 * out[label]['ttft_s']['p99']:8.1f} ms")  # fmt: skip
    out["p50_speedup"] = out["cache off"]["ttft_s"]["p50"] / out["cache on"]["ttft_s"]["p50"]
    print(f"  TTFT p50, cache off / on: {out['p50_speedup']:.1f}x")
    return out | {"prefix_len": prefix_len, "suffix_len": 16, "requests": n - 1}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["load"]
    x = [r["request_throughput"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end-to-end")):
        ax.plot(x, [1e3 * r[key]["p50"] for r in runs], marker="o", label=f"{label} p50")
        ax.plot(x, [1e3 * r[key]["p99"] for r in runs], marker="x", linestyle="--", label=f"{label} p99")
    ax.set_xlabel("achieved requests/s")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"griffon serve, {results['preset']}, {results['machine']['cpu']}"[:80], fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); print and return the results."""
    from griffon.presets import get_preset

    results: dict = {"machine": machine(), "preset": args.preset}
    bad = set((args.engine or "process").split(",")) - set(ENGINES)
    if bad:
        raise SystemExit(f"unknown --engine {sorted(bad)[0]!r}; engines: {', '.join(ENGINES)}")
    base = get_preset(args.preset)
    if args.experiments:
        wanted = set(args.experiments.split(","))
        if wanted - {"offline", "models", "prefix"}:
            raise SystemExit(f"unknown experiments {sorted(wanted - {'offline', 'models', 'prefix'})}")
        if "offline" in wanted:
            print("server vs offline generate:")
            cpus = [int(c) for c in args.client_cpus.split(",")] if args.client_cpus else None
            engines = tuple(args.engine.split(",")) if args.engine else ENGINES
            results["offline"] = experiment_offline(base, 16, 64, 128, args.seed, args.repeats, cpus, engines)
        if "models" in wanted:
            print("Griffin vs MQA transformer, long prompts and outputs:")
            prompt_len, output_len = (int(v) for v in args.long.split(":"))
            results["models"] = experiment_models(base, 16, 8, prompt_len, output_len, args.seed)
        if "prefix" in wanted:
            print(f"TTFT with a shared {args.prefix_len}-token system prompt:")
            results["prefix"] = experiment_prefix(base, 9, args.prefix_len, args.seed)
    else:
        workload = make_workload(args.requests, base.vocab_size, _span(args.prompt_len), _span(args.output_len),
                                 args.shared_prefix, args.prefix_len, args.seed)  # fmt: skip
        rates = [float(r) for r in args.rates.split(",")]
        results["load"] = []
        if args.url:
            _check_loopback(args.url)
            server, url = None, args.url.rstrip("/")
        else:
            server = ServerProcess(base, args.max_batch, prefix_cache=True, engine=args.engine or "process")
            url = server.__enter__()
        try:
            asyncio.run(run_load(url, workload[:2], math.inf, "fixed", args.timeout, args.seed))  # warm-up
            for rate in rates:
                s = asyncio.run(run_load(url, workload, rate, args.arrival, args.timeout, args.seed))
                results["load"].append(s)
                _print(f"rate {rate:g}/s", s)
        finally:
            if server is not None:
                server.__exit__(None, None, None)
        if args.png:
            plot(results, Path(args.png))
    if args.json:
        atomic_write_json(args.json, results)
    return results
