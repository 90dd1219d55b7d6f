"""What the load generator's HTTP client costs: httpx against aiohttp reading the same token streams
from one server (the engine in its own process, 16 streamed requests of 64 + 128 tokens at once),
interleaved, with each client's CPU time as a share of one core.

    python experiments/serve_client_cost.py [--pairs 4]

On a 2-core machine the client shares the server's cores, so its CPU time comes out of the
model's second torch thread; ``griffon bench serve`` uses the cheaper one.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time

import aiohttp
import httpx

from griffon.bench.serve import ServerProcess, make_workload, run_load
from griffon.presets import get_preset


async def _stream(client, url: str, prompt: list[int], max_tokens: int, aio: bool) -> int:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True}
    events = 0
    if aio:
        async with client.post(f"{url}/v1/completions", json=body) as r:
            async for chunk in r.content.iter_any():
                events += chunk.count(b"data: {")
    else:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for chunk in r.aiter_raw():
                events += chunk.count(b"data: {")
    return events


async def load(url: str, workload, aio: bool) -> tuple[float, float]:
    """Streamed events per second and the client's CPU share of one core."""
    n = len(workload) + 4
    if aio:
        client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n))
    else:
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=n), timeout=600)
    async with client:
        t0, cpu0 = time.perf_counter(), time.process_time()
        events = await asyncio.gather(*[_stream(client, url, p, m, aio) for p, m in workload])
        seconds = time.perf_counter() - t0
    return sum(events) / seconds, (time.process_time() - cpu0) / seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--preset", default="griffin-20m")
    args = p.parse_args()
    base = get_preset(args.preset)
    workload = [(pr, 128) for pr, _ in make_workload(16, base.vocab_size, (64, 64), (1, 1), 0.0, 0, 0)]
    with ServerProcess(base, 16, prefix_cache=False, engine="process") as url:
        asyncio.run(run_load(url, workload[:2], math.inf, "fixed", 600, 0))  # warm-up
        for _ in range(args.pairs):
            (hx, hx_cpu), (aio, aio_cpu) = (asyncio.run(load(url, workload, a)) for a in (False, True))
            print(
                f"httpx {hx:6.0f} tok/s, client {hx_cpu:4.0%} of a core | aiohttp {aio:6.0f} tok/s, client {aio_cpu:4.0%}"
            )


if __name__ == "__main__":
    main()
