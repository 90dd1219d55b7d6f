"""The ``griffon`` command line: a thin layer over the library, one module per command
(:mod:`griffon.commands`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from griffon.commands import COMMANDS

    p = argparse.ArgumentParser(prog="griffon", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from griffon.atomic import describe_os_error
    from griffon.train.signals import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm_eval's, options included
        argv = ["lm-eval", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except TrainingInterrupted as e:
        print(f"griffon {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"griffon {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as e:  # ours carry the full story in one line
        print(f"griffon {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is missing, not a directory, not writable, or a full disk
        print(f"griffon {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
