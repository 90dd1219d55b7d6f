"""Where a saturated server's time goes: py-spy samples of the server process under ``bench serve``'s
offline workload (16 requests of 64 prompt tokens and 128 output tokens, all at once), answered
whole and streamed, with the threads apart and with only the thread holding the GIL.

    pip install py-spy
    python experiments/profile_serve.py --out runs/profile_serve [--seconds 20] [--engine thread|process]

Writes one collapsed-stack file per mode and profile (``{whole,streamed}-{all,gil}.txt``) and prints,
per thread, the share of samples in each part of the server (model, sampling, output, HTTP, events,
idle). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from griffon.bench.serve import ServerProcess, make_workload, run_load
from griffon.presets import get_preset

# A sample's part: the first of these found in its stack, innermost frame first.
PARTS = [
    ("model forward", ("runner.py", "model.py", "kernels.py", "rglru", "attention")),
    ("sampling", ("sampling.py",)),
    ("output (text, logprobs)", ("output.py", "generate.py:", "request.py")),
    ("engine bookkeeping", ("engine.py", "scheduler.py")),
    ("events (server.py)", ("server.py", "chat.py")),
    (
        "HTTP (uvicorn, starlette, fastapi, pydantic)",
        ("uvicorn", "starlette", "fastapi", "pydantic", "h11", "httptools"),
    ),
    ("event loop", ("asyncio", "uvloop", "selectors")),
    ("engine process IPC", ("engine_process.py", "connection.py", "pickle")),
]


def part(stack: str) -> str:
    frames = stack.split(";")[::-1]
    for frame in frames:
        for name, keys in PARTS:
            if any(k in frame for k in keys):
                return name
    return "other"


def summarise(path: Path) -> dict[str, Counter]:
    """Samples per thread per part, from a py-spy collapsed file recorded with --threads."""
    threads: dict[str, Counter] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, _, rest = stack.partition(";")
        threads.setdefault(thread, Counter())[part(rest)] += int(count)
    return threads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/profile_serve")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--engine", choices=["thread", "process"], default="thread")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = get_preset("griffin-tiny")
    workload = [(pr, 128) for pr, _ in make_workload(16, base.vocab_size, (64, 64), (1, 1), 0.0, 0, 0)]
    server = ServerProcess(base, 16, prefix_cache=False, engine=args.engine)
    with server as url:
        asyncio.run(run_load(url, workload[:2], math.inf, "fixed", 600, 0))
        for mode in ("whole", "streamed"):
            for profile in ("all", "gil"):
                path = out / f"{mode}-{profile}.txt"
                pids = [str(pid) for pid in server.pids()]
                spies = [
                    subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "--pid",
                            pid,
                            "--format",
                            "raw",
                            "--threads",
                            "--rate",
                            "200",
                            "--duration",
                            str(int(args.seconds)),
                            "--output",
                            f"{path}.{pid}",
                            "--nonblocking",
                            *(["--gil"] if profile == "gil" else ["--idle"]),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    for pid in pids
                ]
                time.sleep(1.0)
                t0, runs, tokens = time.perf_counter(), 0, 0.0
                while time.perf_counter() - t0 < args.seconds - 2:
                    s = asyncio.run(run_load(url, workload, math.inf, "fixed", 600, 0, stream=mode == "streamed"))
                    runs, tokens = runs + 1, tokens + s["output_tokens_per_s"]
                for spy in spies:
                    spy.wait()
                print(f"== {mode}, {profile} ({runs} runs, mean {tokens / max(runs, 1):.0f} tok/s)")
                for pid in pids:
                    for thread, parts in summarise(Path(f"{path}.{pid}")).items():
                        total = sum(parts.values())
                        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in parts.most_common() if v / total >= 0.01)
                        print(f"  pid {pid} {thread} ({total} samples): {shares}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
