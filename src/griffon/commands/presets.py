"""``griffon presets``: list preset names."""

from __future__ import annotations

import argparse

from griffon.presets import preset_names


def run(args: argparse.Namespace) -> None:
    for name in preset_names():
        print(name)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon presets`` to the command line."""
    s = sub.add_parser("presets", help="list preset names")
    s.set_defaults(fn=run)
