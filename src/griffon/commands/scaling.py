"""``griffon scaling``: scaling-law fits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from griffon.atomic import atomic_write


def run_fit(args: argparse.Namespace) -> None:
    from griffon.scaling.fit import finite_json, fit_table, plot, read_runs, summary

    if args.starts is not None and args.starts < 1:
        raise ValueError(f"--starts must be at least 1, got {args.starts}")
    columns = {c: getattr(args, f"{c}_column") for c in ("params", "tokens", "loss", "flops", "family")}
    runs = read_runs(args.results, columns, args.exclude_top_loss)
    fits = fit_table(runs, args.bootstrap, args.seed, args.starts)
    print(summary(fits))
    if args.json:
        text = json.dumps(finite_json(fits), indent=2, allow_nan=False)
        atomic_write(Path(args.json), lambda path: path.write_text(text))
    if args.png:
        plot(runs, fits, args.png)


def run_calibrate(args: argparse.Namespace) -> None:
    from griffon.scaling.calibrate import calibrate
    from griffon.scaling.law import user_law_path

    law = calibrate(args.out, args.law)
    print(f"{law.describe()}\nwritten to {args.law or user_law_path()}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon scaling`` to the command line."""
    from griffon.scaling.fit import DEFAULT_BOOTSTRAP

    s = sub.add_parser("scaling", help="scaling-law fits")
    ssub = s.add_subparsers(dest="scaling_command", required=True)
    f = ssub.add_parser("fit", help="frontier, IsoFLOP and L(N, D) fits with bootstrap intervals")
    f.add_argument("results", help="CSV with columns params, tokens, loss (and optionally family, flops)")
    for column in ("params", "tokens", "loss", "flops", "family"):
        f.add_argument(f"--{column}-column", default=column, help=f"the table's column for {column}")
    f.add_argument("--exclude-top-loss", type=int, default=0, help="drop the K highest-loss runs of each family")
    f.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="resamples for the intervals (0: none)")
    f.add_argument("--starts", type=int, default=None, metavar="K",
                   help="L-BFGS from the K best initialisation grid points (default: every one of them)")  # fmt: skip
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--json", help="write the fits here")
    f.add_argument("--png", help="plot loss vs FLOPs, IsoFLOP profiles and N*(C) here")
    f.set_defaults(fn=run_fit)
    c = ssub.add_parser(
        "calibrate", help="fit the scaling law model=auto plans with, on this machine (~25 min on 2 cores)"
    )
    c.add_argument("--out", default="runs/calibration", help="sweep directory (resumable)")
    c.add_argument(
        "--law", default=None, help="write the law here (default: this machine's law file, used by model=auto)"
    )
    c.set_defaults(fn=run_calibrate)
