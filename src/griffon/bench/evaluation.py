"""lm-evaluation-harness requests/s: griffon's model against lm-eval's own ``hf`` model.

    griffon bench eval [MODEL] [--tasks griffon_next_line,griffon_next_line_long] [--batch-sizes 1,8]
                       [--json out.json]

The same weights are scored twice on the same requests: as griffon's ``griffon`` lm-eval model
(each shared context prefilled once, every choice continued from a copy of the cache), and,
exported with ``griffon export-hf``, as lm-eval's ``hf`` model in fp32 (HF transformers'
``RecurrentGemmaForCausalLM``; each request is context and continuation in one forward, as for
any transformer). MODEL is a run or checkpoint with a tokenizer HF can express; without one, a
random-weight model of the default ``griffon train`` configuration with the byte tokenizer
stands in (scoring costs the same whatever the weights). The requests are those lm-eval builds
for each of ``--tasks`` from the offline task pack; each model first scores a few of them to
warm up. Both answers are compared request by request (the largest difference is printed), so
the speed is that of the same computation. Needs ``griffon[eval]``, ``transformers`` and
``accelerate``.

Sharing a context of C tokens among k continuations of L tokens cuts the tokens read from
k (C + L) to C + k L: the ratio is printed beside each task as the work bound of the speedup
(the forward passes cost about the same per token in both), so the speedup grows with the
context's length, and the printout says how close the measured figure comes to that bound.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from griffon.atomic import atomic_write_json
from griffon.machine import machine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="run or checkpoint (default: random weights, default model config)")
    p.add_argument("--tasks", default="griffon_next_line,griffon_next_line_long",
                   help="comma-separated tasks of the offline pack (or on --include-path)")  # fmt: skip
    p.add_argument("--include-path", help="directory of lm-eval task YAML (default: griffon's task pack)")
    p.add_argument("--limit", type=int, help="questions of each task to use (default: all)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes, the same for both models")
    p.add_argument("--warmup", type=int, default=8, help="requests each model scores before it is timed")
    p.add_argument("--goal", type=float, default=3.0, help="goal: griffon's requests/s over hf's")
    p.add_argument("--json", help="write the results here")


def _requests(task: str, include_path: str, limit: int | None) -> list:
    from lm_eval.tasks import TaskManager, get_task_dict

    task_obj = get_task_dict([task], TaskManager(include_path=include_path))[task]
    task_obj.build_all_requests(limit=limit, rank=0, world_size=1)
    requests = [r for r in task_obj.instances if r.request_type == "loglikelihood"]
    if not requests:
        raise SystemExit(f"task {task} has no loglikelihood requests to time")
    return requests


def _timed(lm, requests: list, warmup: int) -> tuple[float, list[float]]:
    lm.loglikelihood(requests[:warmup], disable_tqdm=True)
    t0 = time.perf_counter()
    answers = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - t0, [float(logprob) for logprob, _ in answers]


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); print and return the results."""
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models
    from lm_eval.models.huggingface import HFLM

    from griffon.checkpoint import open_source, open_source_with_tokenizer, save_pretrained
    from griffon.checkpoint.convert import export_hf
    from griffon.data.tokenizers import ByteTokenizer
    from griffon.eval.harness import TASKS_DIR, GriffonLM
    from griffon.model import Griffon
    from griffon.train.config import TrainConfig

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            source = open_source_with_tokenizer(args.model)
            ckpt, tokenizer = source.path, source.tokenizer
        else:
            torch.manual_seed(0)
            ckpt, tokenizer = Path(tmp) / "griffon", ByteTokenizer()
            save_pretrained(Griffon(TrainConfig().model), ckpt)
            tokenizer.save(ckpt)
        source = open_source(ckpt)
        export_hf(source.config, source.state_dict(), Path(tmp) / "hf", tokenizer)
        griffon_lm = GriffonLM(pretrained=str(ckpt))
        hf_lm = HFLM(pretrained=str(Path(tmp) / "hf"), dtype="float32", device="cpu")
        n_params = griffon_lm.model.num_params()
        results: dict = {"machine": machine(), "model": args.model or "random weights, default config",
                         "params": n_params, "tasks": {}}  # fmt: skip
        print(f"on {results['machine']['cpu']} ({results['machine']['threads']} threads), "
              f"{n_params / 1e6:.2f}M parameters")  # fmt: skip
        for task in tasks:
            requests = _requests(task, args.include_path or str(TASKS_DIR), args.limit)
            results["tasks"][task] = entry = {**_work(griffon_lm, requests), "runs": []}
            print(f"{task}: {len(requests)} requests over {entry['contexts']} contexts; tokens read "
                  f"{entry['tokens_each_request_whole']} one request at a time, {entry['tokens_context_shared']} "
                  f"with shared contexts: work bound {entry['work_bound']:.2f}x")  # fmt: skip
            for batch in batch_sizes:
                griffon_lm.batch_size = batch
                hf_lm.batch_size_per_gpu = batch
                ours, ours_lp = _timed(griffon_lm, requests, args.warmup)
                theirs, theirs_lp = _timed(hf_lm, requests, args.warmup)
                diff = max(abs(a - b) for a, b in zip(ours_lp, theirs_lp, strict=True))
                run = {"batch": batch, "griffon_requests_per_s": len(requests) / ours,
                       "hf_requests_per_s": len(requests) / theirs, "speedup": theirs / ours,
                       "max_abs_loglikelihood_diff": diff}  # fmt: skip
                entry["runs"].append(run)
                print(f"  batch {batch:>3}: griffon {run['griffon_requests_per_s']:8.1f} req/s, "
                      f"lm-eval hf {run['hf_requests_per_s']:8.1f} req/s, {run['speedup']:5.2f}x; "
                      f"largest loglikelihood difference {diff:.1e}")  # fmt: skip
            best = max(r["speedup"] for r in entry["runs"])
            entry["goal"] = {"speedup": args.goal, "best": best, "met": best >= args.goal}
            print(f"  goal griffon >= {args.goal}x lm-eval hf: {'met' if best >= args.goal else 'NOT met'} "
                  f"(best {best:.2f}x, {best / entry['work_bound']:.2f} of the work bound)")  # fmt: skip
    if args.json:
        atomic_write_json(args.json, results)
    return results


def _work(lm, requests: list) -> dict:
    """Tokens each way of scoring reads: every request whole (context and continuation, as the
    ``hf`` model does), or each distinct context once and then every continuation."""
    pairs = [(lm.tok_encode(r.args[0]), lm.tok_encode(r.args[1])) for r in requests]
    contexts = {tuple(c) for c, _ in pairs}
    whole = sum(len(c) + len(k) for c, k in pairs)
    shared = sum(map(len, contexts)) + sum(len(k) for _, k in pairs)
    return {"requests": len(requests), "contexts": len(contexts), "tokens_each_request_whole": whole,
            "tokens_context_shared": shared, "work_bound": whole / shared}  # fmt: skip
