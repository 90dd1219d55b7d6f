"""``griffon sweep``: train the runs of a scaling sweep (resumable), or emit their launch scripts."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from griffon.scaling.sweep import sweep

    sweep(args.spec, args.out, dry_run=args.dry_run, emit_kind=args.emit, only=args.run, collect_only=args.collect)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon sweep`` to the command line."""
    s = sub.add_parser("sweep", help="train the runs of a scaling sweep (resumable), or emit their launch scripts")
    s.add_argument("spec", help="sweep spec, JSON or TOML (see griffon.scaling.sweep)")
    s.add_argument("--out", required=True, help="sweep directory: runs/, results.csv, launch/")
    s.add_argument("--dry-run", action="store_true", help="list the runs with their params, tokens and FLOPs")
    s.add_argument("--emit", choices=["torchrun", "slurm"], help="write one launch script per run instead")
    s.add_argument("--run", help="train this run only (what the launch scripts call)")
    s.add_argument("--collect", action="store_true", help="gather results.csv from the finished runs")
    s.set_defaults(fn=run)
