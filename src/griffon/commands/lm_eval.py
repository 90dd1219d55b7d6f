"""``griffon lm-eval``: lm-evaluation-harness with the griffon model and the offline tasks (needs griffon[eval])."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    try:
        from griffon.eval.harness import main as harness_main
    except ImportError as e:
        raise ValueError(f"griffon lm-eval needs lm-evaluation-harness: pip install 'griffon[eval]' ({e})") from None
    rest = args.lm_eval_args
    harness_main(rest[1:] if rest[:1] == ["--"] else rest)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon lm-eval`` to the command line."""
    s = sub.add_parser("lm-eval", add_help=False,
                       help="lm-evaluation-harness with the griffon model and the offline tasks (needs griffon[eval])")  # fmt: skip
    s.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's own arguments")
    s.set_defaults(fn=run)
