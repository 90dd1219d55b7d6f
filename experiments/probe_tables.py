"""The tables of docs/probes.md from ``griffon probe train`` results.

    python experiments/probe_tables.py runs/probe_study/*/results.json

For each task: every run's exact-match accuracy against length (read only where the run reached
the task at its training length), then the per-symbol learning curves (mean over seeds with a 95%
t interval) and each family's paired difference from the transformer's.
"""

from __future__ import annotations

import json
import sys


def _interval(i: dict) -> str:
    if i["lo"] != i["lo"]:  # NaN: one seed
        return f"{i['mean']:.2f}"
    return f"{i['mean']:.2f} [{i['lo']:.2f}, {i['hi']:.2f}]"


def tables(results: dict) -> str:
    lengths = [str(n) for n in results["lengths"]]
    lines = [f"### {results['task']} ({results['params']}, training length {results['train_length']}, "
             f"Griffin window {results['window']}, {results['steps']} steps, seeds {results['seeds']})", "",
             "| model, seed | reached | " + " | ".join(lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]  # fmt: skip
    for family, m in results["models"].items():
        for run in m["runs"]:
            cells = [f"{run['accuracy'][n]:.2f}" if run["reached"] else f"({run['accuracy'][n]:.2f})" for n in lengths]
            lines.append(
                f"| {family}, {run['seed']} | {'yes' if run['reached'] else 'no'} | " + " | ".join(cells) + " |"
            )
    curves = [dict((s, i) for s, i in m["summary"]["curve"]) for m in results["models"].values()]
    steps = sorted(set.intersection(*(set(c) for c in curves)))  # a resumed run has one more checkpoint
    lines += ["", "Per-symbol accuracy at the training length against steps (mean [95% interval] over seeds):", "",
              "| model | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]  # fmt: skip
    for family, curve in zip(results["models"], curves, strict=True):
        lines.append(f"| {family} | " + " | ".join(_interval(curve[s]) for s in steps) + " |")
    for name, diff in results.get("differences", {}).items():
        by_step = dict((s, i) for s, i in diff)
        lines.append(f"| {name} (paired) | " + " | ".join(_interval(by_step[s]) for s in steps) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(tables(json.load(f)))
