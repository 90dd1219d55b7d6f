"""Wall-clock cost per training token of the MoE study's families, on this machine, in one run.

    python experiments/moe_wallclock.py experiments/moe_study.json --size w96 [--repeats 5]

For each family of the sweep spec at ``--size``: a forward+backward step of the spec's batch
(``data.batch_size`` x ``data.seq_len`` tokens, fp32), timed best of ``--repeats`` with the families
interleaved (the machine's drift hits all alike); printed as tokens/s, exact training FLOPs per
token, and each family's time per token and per FLOP relative to the first family's. Sparse
dispatch has costs the FLOP count does not see (routing, sorting, gathering, scattering).
"""

from __future__ import annotations

import argparse
import time

import torch

from griffon.accounting import active_params, train_flops_per_token
from griffon.machine import machine
from griffon.model import Griffon
from griffon.scaling.sweep import _config, load_spec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--size", default="w96")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    spec = load_spec(args.spec)
    torch.manual_seed(0)
    cases = {}
    for family in spec["families"]:
        cfg = _config(spec, family, args.size)
        model = Griffon(cfg.model).train()
        tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1))
        cases[family] = (model, tokens, train_flops_per_token(cfg.model, cfg.data.seq_len), active_params(cfg.model))
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.repeats):
        for family, (model, tokens, _, _) in cases.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            logits, _ = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            best[family] = min(best[family], time.perf_counter() - t0)
    print(f"{machine()}, {torch.get_num_threads()} threads; size {args.size}, fp32 forward+backward")
    first = next(iter(cases))
    n = cases[first][1][:, :-1].numel()
    for family, (_, _, fpt, active) in cases.items():
        per_token = best[family] / n
        rel_time = per_token / (best[first] / n)
        rel_flop = rel_time / (fpt / cases[first][2])
        print(
            f"  {family:<22} {n / best[family]:9,.0f} tok/s  {fpt:.3g} FLOPs/token  active params {active:,}  "
            f"time/token x{rel_time:.2f}  time/FLOP x{rel_flop:.2f} (vs {first})"
        )


if __name__ == "__main__":
    main()
