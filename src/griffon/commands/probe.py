"""``griffon probe``: the Griffin paper's copying and retrieval probes (docs/probes.md).

griffon probe train TASK --models griffin,hawk,mqa --out DIR [--steps N] [--lengths L ...]
griffon probe eval CHECKPOINT TASK [--lengths L ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

CPU_SCALE = 4
"""The default training length and Griffin window are the paper's divided by this (a CPU's budget)."""


def run_train(args: argparse.Namespace) -> None:
    import torch

    from griffon.checkpoint import load_for_inference
    from griffon.data.tokenizers import ByteTokenizer
    from griffon.machine import free_memory
    from griffon.probes.run import (
        FAMILIES,
        REACHED,
        accuracy,
        check_memory,
        check_model_fits,
        differences,
        example_seq_len,
        longest_prompt,
        plot_results,
        probe_data,
        probe_examples,
        probe_memory,
        summarize,
        write_results,
    )
    from griffon.probes.tasks import get_task
    from griffon.run import Run
    from griffon.train.config import TrainConfig, apply_overrides
    from griffon.train.trainer import train

    task = get_task(args.task, args.param)
    models = args.models.split(",")
    unknown = [m for m in models if m not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown model family {unknown[0]!r}; families: {', '.join(FAMILIES)}")
    length = (
        args.train_length if args.train_length is not None else max(task.train_length // CPU_SCALE, task.min_length)
    )
    window = args.window if args.window is not None else max(task.window // CPU_SCALE, 1)
    if window < 1:
        raise ValueError(f"--window must be at least 1, got {window}")
    lengths = args.lengths or [length * k for k in (1, 2, 4, 8, 16)]
    for n in [length, *lengths]:
        task.check_length(n)

    def config(family: str, seed: int, seq_len: int) -> TrainConfig:
        d = apply_overrides(TrainConfig().to_dict(), [
            f"model={FAMILIES[family]}", "objective=sft", f"data.seq_len={seq_len}", f"data.batch_size={args.batch}",
            f"max_steps={args.steps}", "max_minutes=null", "dtype=fp32", f"save_every={max(args.steps // 5, 1)}",
            "keep_checkpoints=10", f"eval_every={args.steps}", "log_every=10", f"optim.lr={args.lr}",
        ] + ([f"model.attention_window={window}"] if family == "griffin" else [])
          + ([f"model.max_seq_len={longest_prompt(task, lengths) * 5 // 4 + 64}"] if family == "mqa" else [])
          + args.set)  # fmt: skip
        return dataclasses.replace(TrainConfig.from_dict(d), seed=seed)

    # Before anything is drawn: what the lengths and examples would take, by each family's model.
    free = free_memory(torch.device("cpu"))
    for family in models:
        planned = config(family, args.seeds[0], task.prompt_bytes(length)).model
        need = probe_memory(task, planned, length, lengths, args.examples, args.eval_examples, args.batch)
        check_memory(need, free, f"{task.name} at training length {length} and lengths up to {max(lengths)}")
    out = Path(args.out)
    results: dict = {
        "task": task.name, "params": dataclasses.asdict(task), "train_length": length,
        "window": window if "griffin" in models else None,
        "lengths": lengths, "steps": args.steps, "examples": args.examples, "seeds": args.seeds,
        "reached_at": REACHED, "models": {f: {"runs": []} for f in models},
    }  # fmt: skip
    if (out / "results.json").exists():
        # More seeds may join a finished study (its runs are read again), but only under its settings.
        held = json.loads((out / "results.json").read_text())
        changed = [k for k in ("task", "params", "train_length", "window", "lengths", "steps", "examples")
                   if held.get(k) != json.loads(json.dumps(results[k]))]  # fmt: skip
        if changed:
            raise ValueError(
                f"{out} holds a probe study with other settings ({', '.join(changed)}); pick another --out"
            )
    drawn = {
        seed: probe_examples(task, length, args.examples, max(args.examples // 10, 16), seed) for seed in args.seeds
    }
    configs = {}
    for family, seed in itertools.product(models, args.seeds):
        # Per seed, so that a run's config does not depend on which other seeds share the command.
        cfg = config(family, seed, example_seq_len(*drawn[seed]))
        check_model_fits(task, cfg.model, lengths)
        configs[family, seed] = cfg
    for family in models:  # each model's own window (None: global attention or none)
        model_cfg = configs[family, args.seeds[0]].model
        has_local = any(t == "attention" for t in model_cfg.block_types) and not model_cfg.has_global_attention
        results["models"][family]["attention_window"] = model_cfg.attention_window if has_local else None
    tokenizer = ByteTokenizer()
    for seed in args.seeds:
        data = probe_data(*drawn[seed], example_seq_len(*drawn[seed]))
        for family in models:
            run_dir = out / f"{family}-s{seed}"
            t0 = time.perf_counter()
            # A study cut short resumes: finished runs are read again, killed ones go on.
            train(configs[family, seed], run_dir, resume=(run_dir / "config.json").exists(), data=data)
            curve = []  # [step, exact, per symbol] at the training length
            for ckpt in Run(run_dir).checkpoints():
                model = load_for_inference(ckpt, device="cpu")[0]
                a = accuracy(model, tokenizer, task, length, args.eval_examples, seed + 7)
                curve.append([int(ckpt.name.split("_")[1]), a.value, a.per_symbol])
            model = load_for_inference(run_dir, device="cpu")[0]
            scores = {n: accuracy(model, tokenizer, task, n, args.eval_examples, seed + 11) for n in lengths}
            run = {
                "seed": seed, "curve": curve, "accuracy": {n: a.value for n, a in scores.items()},
                "per_symbol": {n: a.per_symbol for n, a in scores.items()},
                "reached": scores[length].value >= REACHED if length in scores else curve[-1][1] >= REACHED,
                "seconds": time.perf_counter() - t0,
            }  # fmt: skip
            results["models"][family]["runs"].append(run)
            print(f"{family} seed {seed}: {'reached' if run['reached'] else 'did not reach'} the task; exact by "
                  f"length {run['accuracy']}; per symbol {run['per_symbol']}; curve {curve}", flush=True)  # fmt: skip
    for m in results["models"].values():
        m["summary"] = summarize(m["runs"])
    if "mqa" in results["models"]:
        results["differences"] = differences(results["models"], "mqa")
    write_results(out / "results.json", results)
    plot_results(results, out / "accuracy.png")
    print(f"results: {out / 'results.json'}, plot: {out / 'accuracy.png'}")


def run_eval(args: argparse.Namespace) -> None:
    import torch

    from griffon.checkpoint import load_for_inference
    from griffon.machine import free_memory
    from griffon.probes.run import accuracy, check_memory, probe_memory
    from griffon.probes.tasks import get_task

    task = get_task(args.task, args.param)
    lengths = args.lengths or [max(task.train_length // CPU_SCALE, task.min_length)]
    for n in lengths:
        task.check_length(n)
    model, tokenizer = load_for_inference(args.checkpoint, device="cpu")
    spaced = tokenizer.kind != "bytes"
    need = probe_memory(task, model.config, None, lengths, 0, args.eval_examples, spaced=spaced)
    check_memory(need, free_memory(torch.device("cpu")), f"{task.name} at lengths up to {max(lengths)}")
    rendering = "side by side" if tokenizer.kind == "bytes" else "spaced"
    for n in lengths:
        a = accuracy(model, tokenizer, task, n, args.eval_examples, args.seed)
        print(f"{task.name} length {n} ({rendering}): {a.correct}/{a.total} exact ({a.value:.1%}), "
              f"{a.per_symbol:.1%} of answer symbols")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon probe`` to the command line."""
    from griffon.probes.tasks import TASKS

    s = sub.add_parser("probe", help="the Griffin paper's copying and retrieval probes")
    psub = s.add_subparsers(dest="probe_command", required=True)
    t = psub.add_parser("train", help="train models on a probe task; accuracy against length and steps")
    t.add_argument("task", choices=list(TASKS))
    t.add_argument("--models", default="griffin,hawk,mqa", help="comma-separated families: griffin, hawk, mqa")
    t.add_argument("--out", required=True)
    t.add_argument("--train-length", type=int, help=f"default: the paper's / {CPU_SCALE}")
    t.add_argument("--window", type=int, help=f"Griffin's local attention window; default: the paper's / {CPU_SCALE}")
    t.add_argument("--lengths", type=int, nargs="+", help="evaluation lengths (default: 1, 2, 4, 8, 16 x training)")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--examples", type=int, default=4000, help="training examples")
    t.add_argument("--eval-examples", type=int, default=100)
    t.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run a family a seed; intervals over seeds")
    t.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a task parameter")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training config override")
    t.set_defaults(fn=run_train)
    e = psub.add_parser("eval", help="probe a checkpoint, without training")
    e.add_argument("checkpoint")
    e.add_argument("task", choices=list(TASKS))
    e.add_argument("--lengths", type=int, nargs="+")
    e.add_argument("--eval-examples", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a task parameter")
    e.set_defaults(fn=run_eval)
