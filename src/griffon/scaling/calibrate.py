"""``griffon scaling calibrate``: fit the law ``model=auto`` plans with, on this machine.

It sweeps the auto family (:func:`griffon.scaling.auto.auto_model`, byte tokenizer, the auto
recipe's sequence length, batch and learning rates) over widths and FLOP budgets on the embedded
corpus with :mod:`griffon.scaling.sweep`, fits ``L(N, D) = E + A/N^alpha + B/D^beta`` in bits per
byte over non-embedding parameters and training bytes with :func:`griffon.scaling.fit.fit_parametric`,
and writes it where ``model=auto`` looks first (:func:`griffon.scaling.law.user_law_path`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from griffon.atomic import atomic_write
from griffon.machine import machine
from griffon.scaling.auto import BATCH, SEQ_LEN, auto_lr, auto_model
from griffon.scaling.fit import fit_parametric, read_runs
from griffon.scaling.law import ScalingLaw, user_law_path
from griffon.scaling.sweep import sweep

WIDTHS = (64, 96, 128, 160, 192, 256)
FLOPS = (4e11, 1.5e12, 5e12, 1.5e13)
"""IsoFLOP budgets, each trained by the three widths nearest one token per parameter, runs of fewer
than :data:`MIN_STEPS` steps left out: 9 runs from 20 seconds to 6 minutes on a 2-core CPU (about
25 minutes in all), spanning the minutes-long runs ``model=auto`` plans for."""
MIN_STEPS = 150


def calibration_spec(
    widths: tuple[int, ...] = WIDTHS, flops: tuple[float, ...] = FLOPS, min_steps: int = MIN_STEPS
) -> dict[str, Any]:
    """The sweep spec of the calibration runs."""
    sizes = {}
    for w in widths:
        m = auto_model(w)
        sizes[f"w{w}"] = {"model.width": w, "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
                          "optim.lr": auto_lr(w)}  # fmt: skip
    return {
        "base": {
            "max_minutes": None,
            "data.seq_len": SEQ_LEN,
            "data.batch_size": BATCH,
            "eval_every": 10**6,
            "save_every": 10**6,
            "log_every": 100,
            "final_eval_batches": 50,
        },  # fmt: skip
        "families": {"auto": {"model": auto_model(widths[0]).to_dict()}},
        "sizes": sizes,
        "isoflop": {"flops": list(flops), "per_budget": 3, "tokens_per_param": 0.5},
        "min_steps": min_steps,
        "seed": 0,
    }


def calibrate(
    out: str | Path,
    law_path: str | Path | None = None,
    widths: tuple[int, ...] = WIDTHS,
    flops: tuple[float, ...] = FLOPS,
    min_steps: int = MIN_STEPS,
) -> ScalingLaw:
    """Run (or resume) the calibration sweep in ``out``, fit the law and save it to ``law_path``
    (default: this machine's law file)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    text = json.dumps(calibration_spec(widths, flops, min_steps), indent=2) + "\n"
    atomic_write(spec_path, lambda tmp: tmp.write_text(text))
    sweep(spec_path, out)
    runs = read_runs(out / "results.csv", {"params": "non_embedding_params", "loss": "val_bpb"})
    fit = fit_parametric(runs)
    info = machine()
    law = ScalingLaw.from_fit(
        fit,
        source={
            "machine": f"{info['cuda'] or info['cpu']}, {info['threads']} threads",
            "date": time.strftime("%Y-%m-%d"),
            "runs": len(runs),
            "widths": list(widths),
            "flops": list(flops),
            "corpus": "embedded Shakespeare, byte tokenizer",
            "at_bound": fit["at_bound"],
            "command": "griffon scaling calibrate",
        },
    )  # fmt: skip
    law.save(law_path or user_law_path())
    return law
