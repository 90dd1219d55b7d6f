"""``griffon train``: train a model (no arguments: a small Griffin on the embedded corpus)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from griffon.atomic import atomic_write


def _train_base(config: str | None, overrides: list[str]) -> dict:
    """The config dict ``griffon train`` starts from: a JSON file, a recipe's name, or the defaults
    with ``model=auto`` when no override names a model."""
    from griffon.train.config import TrainConfig
    from griffon.train.recipes import get_recipe, recipe_names

    if config is None:
        d = TrainConfig().to_dict()
        if not any(o.split("=", 1)[0].split(".")[0] == "model" for o in overrides):
            d["model"] = "auto"
        return d
    if not Path(config).exists() and config in recipe_names():
        return get_recipe(config).to_dict()
    path = Path(config)
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return TrainConfig.load(path).to_dict()  # raises the config loader's clear error
    return d if isinstance(d, dict) and d.get("model") == "auto" else TrainConfig.load(path).to_dict()


def run(args: argparse.Namespace) -> None:
    from griffon.train.config import TrainConfig, apply_overrides, apply_resume_overrides
    from griffon.train.trainer import train

    plan = None
    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.out:
            raise ValueError("--resume continues a run with its saved config.json; drop CONFIG and --out")
        cfg = apply_resume_overrides(TrainConfig.load(run_dir / "config.json"), args.set)
    else:
        if args.checkpoint:
            raise ValueError("--checkpoint chooses where --resume continues from; it needs --resume")
        d = apply_overrides(_train_base(args.config, args.set), args.set)
        run_dir = Path(args.out or time.strftime("runs/%Y%m%d-%H%M%S"))
        if d.get("model") == "auto":
            plan = _plan_auto(d, run_dir, _user_lr(args.config, args.set, d))
            d = plan.config
        cfg = TrainConfig.from_dict(d)
    result = train(cfg, run_dir, resume=bool(args.resume), checkpoint=args.checkpoint)
    if plan is not None:
        text = json.dumps(plan.to_dict(), indent=2) + "\n"
        atomic_write(run_dir / "auto.json", lambda tmp: tmp.write_text(text))
    bpb = f", validation {result.val_bpb:.3f} bits/byte (loss {result.val_loss:.3f})" if result.val_bpb else ""
    print(f"trained {result.steps} steps, {result.tokens:,} tokens at {result.tokens_per_s:,.0f} tokens/s{bpb}")
    print(f"run directory: {run_dir}")


def _user_lr(config: str | None, overrides: list[str], d: dict) -> float | None:
    """The learning rate the user set (``--set optim.lr=...`` or in the config file), which
    ``model=auto`` keeps; None when it is the default's, for the plan to choose."""
    if any(o.split("=", 1)[0].strip() == "optim.lr" for o in overrides):
        return d["optim"]["lr"]
    if config is not None and Path(config).is_file():
        try:
            given = json.loads(Path(config).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(given, dict) and isinstance(given.get("optim"), dict) and "lr" in given["optim"]:
            return d["optim"]["lr"]
    return None


def _plan_auto(d: dict, run_dir: Path, lr: float | None = None):
    """Resolve ``model=auto`` (:mod:`griffon.train.auto`), after the checks that need no model."""
    from griffon.config import ConfigError
    from griffon.train import auto
    from griffon.train.config import TrainConfig
    from griffon.train.run_dir import holds_run
    from griffon.train.trainer import data_sources

    if holds_run(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
    checked = TrainConfig.from_dict({**d, "model": "griffin-demo"})  # everything but the model, before planning
    if checked.data.path is not None and not Path(checked.data.path).exists():
        raise ConfigError(f"data.path {checked.data.path} not found")
    plan = auto.plan(d, data_sources(checked), lr=lr)
    print(plan.explain(), flush=True)
    return plan


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
    s.add_argument("--checkpoint", metavar="NAME", help="with --resume: continue from this checkpoint (step_NNNNNN)")
    s.set_defaults(fn=run)
