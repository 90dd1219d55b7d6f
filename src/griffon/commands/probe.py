"""``griffon probe``: the Griffin paper's copying and retrieval probes (docs/probes.md).

griffon probe train TASK --models griffin,hawk,mqa --out DIR [--steps N] [--lengths L ...]
griffon probe eval CHECKPOINT TASK [--lengths L ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run_train(args: argparse.Namespace) -> None:
    from griffon.probes.study import train_study
    from griffon.probes.tasks import get_task

    out = Path(args.out)
    train_study(
        get_task(args.task, args.param), args.models.split(","), out, args.train_length, args.window, args.lengths,
        args.steps, args.batch, args.lr, args.examples, args.eval_examples, tuple(args.seeds), tuple(args.set),
    )  # fmt: skip
    print(f"results: {out / 'results.json'}, plot: {out / 'accuracy.png'}")


def run_eval(args: argparse.Namespace) -> None:
    import torch

    from griffon.checkpoint import load_for_inference
    from griffon.machine import free_memory
    from griffon.probes.study import accuracy, check_memory, probe_memory
    from griffon.probes.tasks import CPU_SCALE, get_task

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
    from griffon.probes.tasks import CPU_SCALE, TASKS

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
