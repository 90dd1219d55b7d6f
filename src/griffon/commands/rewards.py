"""``griffon rewards``: sample a reference policy's completions and score them (QRPO and DPO data)."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from griffon.align.rewards import check_output, load_reward, read_prompts, sample_rewards
    from griffon.checkpoint import load_for_inference
    from griffon.files import sha256

    reward = load_reward(args.reward) if args.reward else None
    prompts, wheres = read_prompts(args.prompts)
    table = args.reward if args.reward and args.reward.endswith(".jsonl") else None
    if args.dpo_out and Path(args.dpo_out).resolve() == Path(args.out).resolve():
        raise ValueError("--dpo-out and --out are the same file; give two")
    source = {
        "prompts": sha256(args.prompts), "policy": str(Path(args.policy).resolve()), "reward": args.reward,
        "reward_table": sha256(table) if table else None, "n": args.n, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "stop": list(args.stop), "seed": args.seed,
    }  # fmt: skip
    check_output(args.out, {"prompts file": args.prompts, "reward table": table, "DPO output": args.dpo_out}, source)
    model, tokenizer = load_for_inference(args.policy)

    from tqdm import tqdm

    bar = tqdm(total=len(prompts), unit="prompt", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    done = sample_rewards(model, tokenizer, prompts, reward, args.n, args.out, args.dpo_out, args.max_tokens,
                          args.temperature, tuple(args.stop), args.seed, args.max_batch, progress, wheres)  # fmt: skip
    bar.close()
    print(
        f"{done} prompts sampled now, {len(prompts)} in {args.out}"
        + (f"; DPO pairs in {args.dpo_out}" if args.dpo_out else "")
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon rewards`` to the command line."""
    s = sub.add_parser("rewards", help="sample a reference policy's completions and score them (QRPO/DPO data)")
    s.add_argument("prompts", help='JSONL file of {"prompt": ...} lines')
    s.add_argument("--policy", required=True, help="the reference policy: the run or checkpoint alignment starts from")
    s.add_argument("--reward", metavar="MODULE:FUNCTION|FILE.jsonl",
                   help="reward(prompt, completion) -> float, or a JSONL of {prompt, completion, reward} scored "
                        "elsewhere; without it, the completions alone are written, to be scored")  # fmt: skip
    s.add_argument("--n", type=int, default=8, help="completions per prompt (at least 2)")
    s.add_argument("--out", required=True, help="the QRPO dataset (JSONL); resumed if it exists")
    s.add_argument("--dpo-out", help="also write DPO pairs here: each prompt's best completion against its worst")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--stop", action="append", default=[], metavar="TEXT")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-batch", type=int, default=64, help="sequences the engine decodes together")
    s.set_defaults(fn=run)
