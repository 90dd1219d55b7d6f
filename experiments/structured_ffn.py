"""Dense vs LowRank-32% vs LowRank-32% + self-guided training, at equal training FLOPs.

    python experiments/structured_ffn.py [--steps 1500] [--seeds 0] [--out runs/structured_ffn] [--protocol paper]

Griffin-tiny (width 64, 3 layers, GeGLU MLP 192) on the embedded Shakespeare corpus, byte-level,
fp32. The dense run trains ``--steps`` steps; both structured runs get the FLOPs it spent
(``max_flops``), so they take more, cheaper steps; the guided run spends part of that budget on
its dense guides (``self_guided.mode=fixed_flops``, guided for half the dense run's steps).
Prints and writes (``docs/results/structured_ffn_experiment.json``) the validation loss on the
whole held-out split, and plots the training curves against FLOPs.

``--protocol paper`` trains as the StructuredFFN papers' code does (see ``PAPER``): GPT-2
initialisation with q/k/v biases, weight decay on every parameter, betas (0.9, 0.999), 10%
warmup, and in the guided run a 0.3 guided fraction whose extra steps re-read the guided phase's
batches. The learning rate stays this experiment's 4e-3: their 6e-4 is tuned for 110M parameters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from griffon.train.config import TrainConfig, apply_overrides
from griffon.train.trainer import train

COMMON = [
    "model=griffin-tiny", "data.seq_len=128", "data.batch_size=16", "dtype=fp32", "max_minutes=null",
    "eval_every=100000", "eval_batches=20", "final_eval_batches=null", "log_every=10", "save_every=100000",
    "optim.warmup_steps=50",
]  # fmt: skip
LOWRANK_32 = ["model.ffn_structure.kind=lowrank", "model.ffn_structure.rank=16"]  # 64 / 4
GUIDED = ["self_guided.enabled=true", "self_guided.mode=fixed_flops", "self_guided.fraction=0.5"]
PAPER = [
    "model.init=gpt2", "model.init_std=0.02", "model.qkv_bias=true", "optim.decay=all", "optim.beta2=0.999",
    "optim.warmup_fraction=0.1",
]  # fmt: skip
PAPER_GUIDED = ["self_guided.enabled=true", "self_guided.mode=fixed_flops", "self_guided.fraction=0.3",
                "self_guided.extra_steps_data=reread"]  # fmt: skip


def run(name: str, overrides: list[str], out: Path) -> dict:
    cfg = TrainConfig.from_dict(apply_overrides(TrainConfig().to_dict(), COMMON + overrides))
    r = train(cfg, out / name)
    print(f"{name:24s} steps {r.steps:5d}  FLOPs {r.flops:.4g}  val loss {r.val_loss:.4f}  bpb {r.val_bpb:.4f}")
    return {"steps": r.steps, "tokens": r.tokens, "flops": r.flops, "val_loss": r.val_loss, "val_bpb": r.val_bpb}


def plot(results: dict, out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in results:
        records = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
        train_records = [r for r in records if r["kind"] == "train"]
        flops_per_token = results[name]["flops"] / results[name]["tokens"]
        ax.plot([r["tokens"] * flops_per_token for r in train_records], [r["loss"] for r in train_records],
                label=name, lw=1)  # fmt: skip
    ax.set_xlabel("training FLOPs (approx., mean per token)")
    ax.set_ylabel("train loss (nats/byte)")
    ax.set_ylim(top=2.6)
    ax.legend()
    ax.set_title("Griffin-tiny FFN: dense vs LowRank-32% at equal FLOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="runs/structured_ffn")
    p.add_argument("--json", default="docs/results/structured_ffn_experiment.json")
    p.add_argument("--plot", default="docs/results/structured_ffn_experiment.png")
    p.add_argument("--protocol", choices=["griffon", "paper"], default="griffon")
    args = p.parse_args()
    paper = args.protocol == "paper"
    guided = PAPER_GUIDED if paper else GUIDED
    results: dict = {}
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        s = [f"seed={seed}"] + (PAPER if paper else [])
        dense = run("dense", s + [f"max_steps={args.steps}"], out)
        budget = f"max_flops={dense['flops']}"
        seed_results = {
            "dense": dense,
            "lowrank-32%": run("lowrank-32%", s + LOWRANK_32 + [budget], out),
            "lowrank-32%+self-guided": run("lowrank-32%+self-guided", s + LOWRANK_32 + [budget] + guided, out),
        }
        results[f"seed{seed}"] = seed_results
        if seed == args.seeds[0]:
            plot(seed_results, out, Path(args.plot))
    record = {"steps": args.steps, "protocol": args.protocol, "results": results}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
