"""Griffin-MoE against dense Griffin at w32 over seeds: the MoE study's table (seed 0) and the
runs of experiments/moe_study_seeds.sh (seeds 1, 2), the paired differences per budget with a
95% t interval.

    python experiments/moe_seed_table.py [--study docs/results/moe_study.csv]
        [--seeds runs/moe_study_seeds] [--json docs/results/moe_seeds.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from scipy import stats


def losses(table: Path) -> dict[tuple[str, str], float]:
    """(family, budget) -> validation loss of the w32 runs in a sweep's results table."""
    rows = csv.DictReader(table.open())
    return {(r["family"], r["budget"]): float(r["val_loss"]) for r in rows if r["size"] == "w32"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--study", default="docs/results/moe_study.csv")
    p.add_argument("--seeds", default="runs/moe_study_seeds")
    p.add_argument("--json")
    args = p.parse_args()
    tables = [losses(Path(args.study))] + [
        losses(path) for path in sorted(Path(args.seeds).glob("seed*/results.csv"))
    ]  # fmt: skip
    out = {}
    print("budget    Griffin (per seed)        Griffin-MoE (per seed)    MoE - dense: mean [95% t interval]")
    for budget in sorted({b for _, b in tables[0]}, key=lambda b: float(b[3:])):
        dense = [t[("griffin", budget)] for t in tables]
        moe = [t[("griffin-moe", budget)] for t in tables]
        diff = [m - d for m, d in zip(moe, dense, strict=True)]
        mean, sem = statistics.mean(diff), statistics.stdev(diff) / len(diff) ** 0.5
        half = stats.t.ppf(0.975, len(diff) - 1) * sem
        out[budget] = {"griffin": dense, "griffin_moe": moe, "difference": diff,
                       "mean": mean, "interval": [mean - half, mean + half]}  # fmt: skip
        print(f"{budget:<9} {' '.join(f'{x:.3f}' for x in dense):<25} {' '.join(f'{x:.3f}' for x in moe):<25} "
              f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": len(tables), "size": "w32", "budgets": out}, indent=2))


if __name__ == "__main__":
    main()
