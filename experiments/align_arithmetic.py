"""DPO against QRPO from the same reference samples, on two-digit addition (an exact reward).

    python experiments/align_arithmetic.py --out runs/align_arithmetic \\
        --json docs/results/align_arithmetic.json --png docs/results/align_arithmetic.png

1. SFT a small Griffin (``griffin-tiny``, from scratch) on 4,000 sums (``griffon.align.arithmetic``),
   briefly, so that it is right part of the time: the reference policy.
2. ``griffon rewards``: 8 completions of each of 400 other prompts from it, scored with the exact
   reward; the QRPO dataset and the best-against-worst DPO pairs of those same samples.
3. DPO and QRPO from the reference, at each beta, the same steps and learning rate.
4. On 300 held-out prompts, 4 samples each at temperature 1: the mean reward, and the KL from the
   reference (:func:`sequence_kl`); plus the share of greedy answers that are right.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from griffon.align import arithmetic
from griffon.align.preference import build_rows
from griffon.align.qrpo import QRPO
from griffon.checkpoint import load_for_inference
from griffon.cli import main
from griffon.engine import Engine, SamplingParams
from griffon.machine import machine

COMMON = ["--set=dtype=fp32", "--set=max_minutes=null", "--set=data.seq_len=16", "--set=eval_every=1000",
          "--set=log_every=25", "--set=eval_batches=4", "--set=final_eval_batches=8"]  # fmt: skip


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check(argv: list[str]) -> None:
    if main(argv) != 0:
        raise SystemExit(f"failed: griffon {' '.join(argv)}")


def evaluate(policy: Path, reference: Path, prompts: list[str], samples: int, seed: int) -> dict:
    """Mean reward of ``samples`` completions a prompt at temperature 1, the KL estimate, and the
    share of greedy answers that are right."""
    model, tokenizer = load_for_inference(policy, device="cpu")
    ref_model, _ = load_for_inference(reference, device="cpu")
    engine = Engine(
        model, tokenizer, max_batch=64, max_queue=len(prompts) * (samples + 1), prefix_cache_bytes=0, step="model"
    )
    sampled = [[engine.submit(tokenizer.encode(p), SamplingParams(max_tokens=4, temperature=1.0,
                                                                    seed=seed + i * samples + j, stop=("\n",)))
                for j in range(samples)] for i, p in enumerate(prompts)]  # fmt: skip
    greedy = [engine.submit(tokenizer.encode(p), SamplingParams(max_tokens=4, temperature=0.0, stop=("\n",)))
              for p in prompts]  # fmt: skip
    engine.run_until_done()
    rows, rewards = [], []
    for p, reqs in zip(prompts, sampled, strict=True):
        scores = [arithmetic.reward(p, r.text.visible(final=True)) for r in reqs]
        rewards += scores
        # as QRPO's data are: each completion (the stop's token too) scored beside its prompt's others
        rows += [{"prompt": p, "completion": tokenizer.decode(r.tokens), "reward": s, "ref_rewards": scores}
                 for r, s in zip(reqs, scores, strict=True)]  # fmt: skip
    seqs = build_rows(rows, QRPO, tokenizer, 16)
    right = [arithmetic.reward(p, g.text.visible(final=True)) == 1.0 for p, g in zip(prompts, greedy, strict=True)]
    return {"reward": sum(rewards) / len(rewards), "kl": sequence_kl(model, ref_model, seqs),
            "greedy_accuracy": sum(right) / len(right)}  # fmt: skip


@torch.no_grad()
def sequence_kl(model, ref_model, rows) -> float:
    """KL(pi || pi_ref) per completion, estimated on completions sampled from pi: along each, the
    exact KL of the next-token distributions summed over its tokens (unbiased, never negative,
    and far less noisy than the mean of log pi - log pi_ref, which DPO's rare off-reference
    samples make heavy-tailed)."""
    tokens, seg, targets = (torch.from_numpy(a) for a in (rows.tokens, rows.segment_pos, rows.targets))
    logp = torch.log_softmax(model(tokens[:, :-1], seg[:, :-1])[0].double(), -1)  # (B, T, V)
    ref = torch.log_softmax(ref_model(tokens[:, :-1], seg[:, :-1])[0].double(), -1)
    kl = (logp.exp() * (logp - ref)).sum(-1)  # (B, T): at each position, KL of the next token
    return float((kl * targets[:, 1:]).sum(1).mean())


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs = arithmetic.make_prompts(4000, seed=0)
    align_pairs = arithmetic.make_prompts(400, seed=1)
    held_out = [arithmetic.prompt(a, b) for a, b in arithmetic.make_prompts(300, seed=2)]
    sft_data = _jsonl(out / "sft.jsonl", [arithmetic.sft_example(a, b) for a, b in train_pairs])
    prompts = _jsonl(out / "prompts.jsonl", [{"prompt": arithmetic.prompt(a, b)} for a, b in align_pairs])
    sft = out / "sft"
    if not (sft / "config.json").is_file():
        _check(["train", "--out", str(sft), "--set=model=griffin-tiny", "--set=objective=sft",
                f"--set=data.path={sft_data}", "--set=data.batch_size=32", f"--set=max_steps={args.sft_steps}",
                "--set=optim.lr=3e-3", *COMMON])  # fmt: skip
    rewarded, pairs = out / "rewarded.jsonl", out / "pairs.jsonl"
    _check(["rewards", str(prompts), "--policy", str(sft), "--reward", "griffon.align.arithmetic:reward",
            "--n", "8", "--out", str(rewarded), "--dpo-out", str(pairs), "--max-tokens", "4", "--stop", "\n"])  # fmt: skip
    results: dict = {"machine": machine(), "sft_steps": args.sft_steps, "align_steps": args.steps,
                     "lr": args.lr, "betas": args.betas, "runs": {}}  # fmt: skip
    results["runs"]["reference"] = evaluate(sft, sft, held_out, 4, seed=10)
    print(f"reference: {results['runs']['reference']}", flush=True)
    for kind, data in (("dpo", pairs), ("qrpo", rewarded)):
        for beta in args.betas:
            name = f"{kind}-beta{beta:g}"
            run_dir = out / name
            if not (run_dir / "config.json").is_file():
                _check(["train", "--out", str(run_dir), "--init", str(sft), f"--set=objective={kind}",
                        f"--set=data.path={data}", f"--set=beta={beta}", f"--set=max_steps={args.steps}",
                        "--set=data.batch_size=16", f"--set=optim.lr={args.lr}", "--set=optim.warmup_steps=10",
                        *COMMON])  # fmt: skip
            results["runs"][name] = evaluate(run_dir, sft, held_out, 4, seed=10)
            print(f"{name}: {results['runs'][name]}", flush=True)
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ref = results["runs"]["reference"]
    ax.scatter([0], [ref["reward"]], color="black", label="reference (SFT)")
    for kind, color in (("dpo", "tab:blue"), ("qrpo", "tab:orange")):
        points = [(v["kl"], v["reward"], k) for k, v in results["runs"].items() if k.startswith(kind)]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=kind.upper())
        for kl, r, name in points:
            ax.annotate(name.split("-")[1], (kl, r), fontsize=7)
    ax.set_xlabel("KL(pi || pi_ref), nats per completion (estimated on samples)")
    ax.set_ylabel("mean reward, held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/align_arithmetic")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.2, 1.0])
    p.add_argument("--json")
    p.add_argument("--png")
    args = p.parse_args()
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    cli()
