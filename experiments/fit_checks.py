"""How the parametric fit's shortcuts and the bootstrap's size move the reported numbers.

    python experiments/fit_checks.py --json docs/results/fit_checks.json

On the Chinchilla points (Hoffmann et al. 2022, Figure 4, as Besiroglu et al. 2024 extracted
them: 245 runs, ``tests/data/chinchilla_points.csv``; the 5 highest-loss runs left out, as they
did):

1. the point estimate from every one of the 4,500 grid points against one from the 32 best;
2. bootstrap intervals with L-BFGS from the 8 best grid points per resample (the default) against
   the 64 best, on the same 100 resamples;
3. intervals from 200 resamples under three seeds, and the time each took: the Monte Carlo
   spread of the intervals' ends at the default, which sets the digits worth printing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from griffon.machine import machine
from griffon.scaling.fit import (
    BOOTSTRAP_STARTS,
    DEFAULT_BOOTSTRAP,
    PARAMETRIC_GRID,
    fit_family,
    fit_parametric,
    read_runs,
)

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("E", "A", "B", "alpha", "beta", "a", "b")


def _rounded(values: dict, digits: int = 4) -> dict:
    return {k: float(f"{v:.{digits}g}") for k, v in values.items() if k in KEYS}


def _intervals(runs, resamples: int, seed: int, starts: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    fit = fit_family(runs, bootstrap=resamples, seed=seed, starts=starts)["parametric"]
    spans = {k: [float(f"{lo:.4g}"), float(f"{hi:.4g}")] for k, (lo, hi) in fit["intervals"].items() if k in KEYS}
    return spans, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resamples", type=int, default=100, help="bootstrap resamples of check 2")
    p.add_argument("--json")
    args = p.parse_args()
    out: dict = {"machine": machine()}

    chinchilla = read_runs(ROOT / "tests/data/chinchilla_points.csv", exclude_top_loss=5)
    t0 = time.perf_counter()
    every = fit_parametric(chinchilla)
    t_every = time.perf_counter() - t0
    t0 = time.perf_counter()
    best32 = fit_parametric(chinchilla, keep=32)
    t_32 = time.perf_counter() - t0
    out["point_estimate"] = {
        "runs": len(chinchilla), "every_start": _rounded(every), "every_start_s": t_every,
        "starts": len(PARAMETRIC_GRID), "best_32": _rounded(best32), "best_32_s": t_32,
        "objective_every": every["objective"], "objective_32": best32["objective"],
    }  # fmt: skip
    print(f"Chinchilla ({len(chinchilla)} runs): every start {_rounded(every)} ({t_every:.0f} s)")
    print(f"                     best 32     {_rounded(best32)} ({t_32:.1f} s)")

    cut = {}
    for starts in (BOOTSTRAP_STARTS, 64):
        spans, seconds = _intervals(chinchilla, args.resamples, seed=0, starts=starts)
        cut[starts] = {"intervals": spans, "seconds": seconds}
        print(f"bootstrap {args.resamples} x {starts} starts ({seconds:.0f} s): {spans}")
    out["bootstrap_starts"] = {"resamples": args.resamples, **{str(k): v for k, v in cut.items()}}
    out["bootstrap_starts"]["same_at_4_digits"] = cut[BOOTSTRAP_STARTS]["intervals"] == cut[64]["intervals"]

    seeds = {}
    for seed in (0, 1, 2):
        spans, seconds = _intervals(chinchilla, DEFAULT_BOOTSTRAP, seed, starts=BOOTSTRAP_STARTS)
        seeds[str(seed)] = {"intervals": spans, "seconds": seconds}
        print(f"bootstrap {DEFAULT_BOOTSTRAP}, seed {seed} ({seconds:.0f} s): {spans}")
    spread = {k: [max(abs(a[k][i] - b[k][i]) / abs(a[k][i]) for a in (v["intervals"] for v in seeds.values())
                      for b in (v["intervals"] for v in seeds.values())) for i in (0, 1)] for k in KEYS}  # fmt: skip
    out["bootstrap_seeds"] = {"resamples": DEFAULT_BOOTSTRAP, **seeds, "largest_relative_difference": spread}
    print(f"largest relative difference of an interval's end between seeds: {spread}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
