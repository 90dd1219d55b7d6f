"""``griffon train``: train a model (no arguments: a small Griffin on the embedded corpus)."""

from __future__ import annotations

import argparse
import json
import time

from griffon.atomic import atomic_write


def run(args: argparse.Namespace) -> None:
    from griffon.run import Run
    from griffon.scaling import auto
    from griffon.train.config import TrainConfig, apply_overrides, apply_resume_overrides
    from griffon.train.init import init_config, open_init
    from griffon.train.recipes import starting_config
    from griffon.train.trainer import train

    plan = None
    if args.resume:
        run = Run(args.resume)
        if args.config or args.out or args.init:
            raise ValueError("--resume continues a run with its saved config.json; drop CONFIG, --out and --init")
        cfg = apply_resume_overrides(TrainConfig.load(run.config), args.set)
    else:
        if args.checkpoint:
            raise ValueError("--checkpoint chooses where --resume continues from; it needs --resume")
        d = apply_overrides(starting_config(args.config, args.set), args.set)
        if args.init:
            d = init_config(d, open_init(args.init), args.set, given=args.init)
        run = Run(args.out or time.strftime("runs/%Y%m%d-%H%M%S"))
        if d.get("model") == "auto":
            plan = auto.plan_new_run(d, run, auto.user_lr(args.config, args.set, d))
            print(plan.explain(), flush=True)
            d = plan.config
        cfg = TrainConfig.from_dict(d)
    result = train(cfg, run, resume=bool(args.resume), checkpoint=args.checkpoint)
    if plan is not None:
        text = json.dumps(plan.to_dict(), indent=2) + "\n"
        atomic_write(run.auto_plan, lambda tmp: tmp.write_text(text))
    bpb = f", validation {result.val_bpb:.3f} bits/byte (loss {result.val_loss:.3f})" if result.val_bpb else ""
    print(f"trained {result.steps} steps, {result.tokens:,} tokens at {result.tokens_per_s:,.0f} tokens/s{bpb}")
    print(f"run directory: {run.root}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon train`` to the command line."""
    s = sub.add_parser("train", help="train a model (no arguments: a small Griffin on the embedded corpus)")
    s.add_argument(
        "config", nargs="?", help="training config JSON or a recipe (structuredffn-s, ...); default: built-in defaults"
    )
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 --set model=hawk-tiny")  # fmt: skip
    s.add_argument("--out", default=None, help="run directory, must not hold a run (default: runs/DATE-TIME)")
    s.add_argument("--resume", metavar="RUN",
                   help="continue the run in RUN from its newest checkpoint (--set may change budgets, "
                        "optim.lr and clipping, and bookkeeping such as save_every)")  # fmt: skip
    s.add_argument("--init", metavar="SRC",
                   help="start from this model's weights, config and tokenizer: a run, a checkpoint, an HF "
                        "RecurrentGemma directory (griffon export-hf) or a converted RecurrentGemma")  # fmt: skip
    s.add_argument("--checkpoint", metavar="NAME", help="with --resume: continue from this checkpoint (step_NNNNNN)")
    s.set_defaults(fn=run)
