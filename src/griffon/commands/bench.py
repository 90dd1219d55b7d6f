"""``griffon bench``: benchmarks that ship with the package."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon bench`` to the command line."""
    s = sub.add_parser("bench", help="benchmarks that ship with the package")
    bsub = s.add_subparsers(dest="bench_command", required=True)
    import importlib

    from griffon.bench import BENCHMARKS

    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(f"griffon.bench.{module_name}")
        b = bsub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        module.add_arguments(b)
        b.set_defaults(fn=module.run)
