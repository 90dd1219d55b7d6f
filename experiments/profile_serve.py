"""Where a saturated server's time goes: py-spy samples of the server process under ``bench serve``'s
offline workload (16 requests of 64 prompt tokens and 128 output tokens, all at once), answered
whole and streamed, with each thread apart.

    pip install py-spy
    python experiments/profile_serve.py --out runs/profile_serve [--seconds 20] [--engine thread|process]

Writes one collapsed-stack file per mode and process (``{whole,streamed}-active.txt.PID``: py-spy
samples every Python thread, running or not) and prints, per thread of the server's processes, its
CPU time as a share of one core (from /proc) and how its samples outside waits split between the
parts of the server (model, sampling, output, engine bookkeeping, events, HTTP, the event loop,
the pipe); the event loop's thread shows as waiting while it is in uvloop's C code. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from griffon.bench.serve import ServerProcess, make_workload, run_load
from griffon.presets import get_preset

# A sample's part: the first of these found in its stack, innermost frame first.
PARTS = [
    ("waiting", ("select (", "poll (", "wait (", "_recv (", "recv_bytes", "sleep", "acquire (", "Runner.run (")),
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


RATE = 200  # samples per second


def part(stack: str) -> str:
    frames = stack.split(";")[::-1]
    if frames and any(k in frames[0] for k in PARTS[0][1]):
        return "waiting"
    for frame in frames:
        for name, keys in PARTS[1:]:
            if any(k in frame for k in keys):
                return name
    return "other"


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid`` so far."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


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
    p.add_argument("--preset", default="griffin-20m", help="as bench serve's default")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = get_preset(args.preset)
    workload = [(pr, 128) for pr, _ in make_workload(16, base.vocab_size, (64, 64), (1, 1), 0.0, 0, 0)]
    server = ServerProcess(base, 16, prefix_cache=False, engine=args.engine)
    with server as url:
        asyncio.run(run_load(url, workload[:2], math.inf, "fixed", 600, 0))
        for mode in ("whole", "streamed"):
            for profile in ("active",):
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
                cpu0 = {pid: thread_cpu(int(pid)) for pid in pids}
                t0, runs, tokens = time.perf_counter(), 0, 0.0
                while time.perf_counter() - t0 < args.seconds - 2:
                    s = asyncio.run(run_load(url, workload, math.inf, "fixed", 600, 0, stream=mode == "streamed"))
                    runs, tokens = runs + 1, tokens + s["output_tokens_per_s"]
                cpu1 = {pid: thread_cpu(int(pid)) for pid in pids}
                elapsed = time.perf_counter() - t0
                for spy in spies:
                    spy.wait()
                print(f"== {mode}, {profile} ({runs} runs, mean {tokens / max(runs, 1):.0f} tok/s)")
                for pid in pids:
                    for thread, parts in summarise(Path(f"{path}.{pid}")).items():
                        tid = int(thread.split("(")[1].split(")")[0])
                        busy = (cpu1[pid].get(tid, 0.0) - cpu0[pid].get(tid, 0.0)) / elapsed
                        working = sum(v for k, v in parts.items() if k != "waiting")
                        shares = ", ".join(
                            f"{k} {v / working:.0%}"
                            for k, v in parts.most_common()
                            if k != "waiting" and v / working >= 0.01
                        )
                        print(f"  pid {pid} {thread}: CPU {busy:.0%} of a core; of its samples outside waits: {shares}")
                    others = sum(cpu1[pid].get(t, 0.0) - cpu0[pid].get(t, 0.0) for t in cpu1[pid]) / elapsed
                    print(f"  pid {pid} all threads (torch's workers included): CPU {others:.0%} of a core")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
