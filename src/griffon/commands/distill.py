"""``griffon distill``: a pretrained transformer made into a Griffin or Hawk student, trained as a
griffon run (stage 1, attention transfer; stage 2, end-to-end distillation)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def run(args: argparse.Namespace) -> None:
    from griffon.checkpoint import open_source
    from griffon.config import ModelConfig, apply_overrides
    from griffon.distill.data import teacher_corpus
    from griffon.distill.objectives import check_distillation
    from griffon.distill.student import STUDENTS, student_config
    from griffon.run import Run
    from griffon.train.config import TrainConfig
    from griffon.train.init import init_config, open_init
    from griffon.train.trainer import train

    teacher = open_source(args.teacher)
    if teacher.tokenizer is None:
        raise ValueError(f"the teacher {args.teacher} has no tokenizer: the student must read its tokens")
    d = TrainConfig().to_dict()
    d["objective"] = "distill_align" if args.stage == "align" else "distill"
    if args.init:  # stage 2 from stage 1's student: its model and tokenizer
        d = init_config(d, open_init(args.init), args.set, given=args.init)
    else:
        if args.student in STUDENTS:
            student = student_config(teacher.config, STUDENTS[args.student], args.window)
        else:
            student = ModelConfig.from_json(args.student)
        d["model"] = student.to_dict()
        spec = teacher.tokenizer_spec  # recorded absolute: a resume may run from another directory
        d["data"]["tokenizer"] = spec if spec == "bytes" else str(Path(spec).resolve())
    d["distill"]["teacher"] = str(teacher.path.resolve())
    cfg = TrainConfig.from_dict(apply_overrides(d, args.set))  # checked before any sampling
    run_dir = Run(args.out or time.strftime("runs/distill-%Y%m%d-%H%M%S"))
    if args.prompts:
        if any(o.split("=", 1)[0].strip() == "data.path" for o in args.set):
            raise ValueError("--prompts samples the data from the teacher: drop --set data.path")
        run_dir.check_new()
        check_distillation(cfg.distill.teacher, cfg.model, cfg.distill.init, cfg.data.tokenizer)
        corpus = run_dir.root.resolve().with_name(run_dir.root.name + ".corpus.jsonl")
        n = teacher_corpus(teacher.path, args.prompts, corpus, args.samples, args.max_new_tokens, seed=cfg.seed)
        print(f"sampled {n} documents from the teacher into {corpus}", flush=True)
        cfg = TrainConfig.from_dict(apply_overrides(d, [*args.set, f"data.path={corpus}"]))
    result = train(cfg, run_dir)
    bpb = f", validation {result.val_bpb:.3f} bits/byte" if result.val_bpb else ""
    print(f"distilled {result.steps} steps, {result.tokens:,} tokens (validation loss {result.val_loss:.4g}{bpb})")
    print(f"run directory: {run_dir.root}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon distill`` to the command line."""
    s = sub.add_parser("distill", help="distil a pretrained transformer into a Griffin or Hawk student")
    s.add_argument("--teacher", required=True, metavar="SRC",
                   help="the teacher: a run, a checkpoint or an HF Llama-family directory (GGUF: griffon convert "
                        "it first)")  # fmt: skip
    s.add_argument("--student", default="griffin",
                   help="griffin (two recurrent layers per attention layer kept), hawk (no attention kept), or a "
                        "model config JSON of the teacher's shapes (default: griffin)")  # fmt: skip
    s.add_argument("--window", type=int, default=1024, help="the kept attention layers' local window (default 1024)")
    s.add_argument("--stage", choices=("align", "distill"), default="distill",
                   help="align: each new block to the attention it replaces (stage 1); distill: the student's "
                        "distribution to the teacher's (stage 2, default)")  # fmt: skip
    s.add_argument("--init", metavar="RUN", help="start from this student (stage 1's run) instead of the teacher")
    s.add_argument("--out", help="run directory, must not hold a run (default: runs/distill-DATE-TIME)")
    s.add_argument("--prompts", metavar="FILE",
                   help="sample the data from the teacher: its completions of these prompts ({\"prompt\": ...} "
                        "lines, rendered with its chat template), written to OUT.corpus.jsonl (resumable)")  # fmt: skip
    s.add_argument("--samples", type=int, default=4, help="with --prompts: completions of each prompt (default 4)")
    s.add_argument("--max-new-tokens", type=int, default=256, help="with --prompts: tokens a completion (default 256)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data.path=corpus.jsonl --set distill.temperature=2")  # fmt: skip
    s.set_defaults(fn=run)
