"""Sweeps of training runs: ``griffon sweep SPEC --out DIR [--dry-run | --emit torchrun|slurm | --run NAME | --collect]``.

A spec (JSON or TOML) crosses model families with sizes and training budgets::

    {
      "base": {"max_minutes": null, "data.seq_len": 128},            # train-config overrides for every run
      "families": {"griffin": {"model": "griffin-demo"},             # "model": a preset; other keys: overrides
                   "hawk": {"model": "griffin-demo", "model.block_pattern": ["recurrent"]},
                   "griffin-lowrank": {"model": "griffin-demo", "model.ffn_structure.kind": "lowrank",
                                       "sizes": {"w64": {"model.ffn_structure.rank": 16},   # per size,
                                                 "w128": {"model.ffn_structure.rank": 32}}}},  # after the size's
      "sizes": {"w64": {"model.width": 64, "model.num_heads": 1},    # overrides per size
                "w128": {"model.width": 128, "model.num_heads": 2}},
      "budgets": {"tokens": [1e6, 4e6]},                             # or "flops", or "tokens_per_param"
      "isoflop": {"flops": [1e13, 3e13], "per_budget": 3},           # optional IsoFLOP grid
      "min_steps": 100,                                              # optional: leave out shorter runs
      "seed": 0
    }

Keys are the dotted ``--set`` keys of ``griffon train``. Every run is an ordinary griffon run
directory under ``DIR/runs/NAME``; its config is fixed by the spec, so rerunning the sweep skips
finished runs (``result.json`` present) and resumes killed ones. FLOPs are griffon's exact training
FLOPs (:mod:`griffon.accounting`), not 6ND (which the table also gives). For an IsoFLOP budget C,
each family trains the ``per_budget`` sizes nearest the size a ``tokens_per_param`` ratio (default
20, Hoffmann et al.) would call compute-optimal, each for the tokens C buys it.

Execution is sequential on this machine; ``--emit torchrun`` or ``--emit slurm`` instead writes
one launch script per run (``torchrun`` on one node; ``sbatch`` calling ``srun torchrun`` on a
cluster), each running ``griffon sweep SPEC --out DIR --run NAME``; ``--collect`` then gathers the
results table, ``DIR/results.csv`` (and ``results.parquet`` with pyarrow), from the run directories.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from griffon.accounting import active_params, ffn_params, param_counts, train_flops_per_token
from griffon.atomic import atomic_write
from griffon.config import ConfigError
from griffon.data.training_data import TrainingData
from griffon.files import CONFIG_BYTES, FileError, read_text
from griffon.run import Run
from griffon.train.config import TrainConfig, apply_overrides

SPEC_KEYS = {"base", "families", "sizes", "budgets", "isoflop", "min_steps", "seed"}
BUDGET_KINDS = ("tokens", "flops", "tokens_per_param")
COLUMNS = ["run", "family", "size", "budget", "config_hash", "params", "non_embedding_params", "active_params", "ffn_params",
           "flops", "flops_6nd", "tokens", "steps", "val_loss", "val_bpb", "wall_s", "tokens_per_s", "device",
           "seed", "git_commit"]  # fmt: skip


class SweepError(ConfigError):
    """The sweep spec is invalid or names a run that cannot be trained."""


@dataclass
class PlannedRun:
    name: str
    family: str
    size: str
    budget: str
    config: TrainConfig
    params: int
    non_embedding_params: int
    tokens: int
    steps: int
    flops: float

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config.model.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# Family and size names become parts of run names, hence directory names and words in launch
# scripts: letters, digits, '.', '_' and '-', not starting with '.' or '-', at most 64 characters.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
# A run's name: FAMILY-SIZE-BUDGET, the budget a number's label ("t1e+06", "iso3e+13").
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise SweepError(f"sweep spec: key {k!r} appears twice in one object")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise SweepError(f"sweep spec: {name} is not a number a budget can be (JSON has no {name})")


def _positive_numbers(values: Any, where: str) -> None:
    ok = isinstance(values, list) and values and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    )  # fmt: skip
    if not ok:
        raise SweepError(f"sweep spec: {where} must be a non-empty list of positive finite numbers, got {values!r}")


def _positive_int(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SweepError(f"sweep spec: {where} must be a positive integer, got {value!r}")


def _overrides_object(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, dict):
        raise SweepError(f"sweep spec: {where} must be an object of train-config overrides, got {value!r}")


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML spec and check it: keys, types, names, budgets. Raises :class:`SweepError`
    with one line naming what is wrong."""
    path = Path(path)
    try:
        text = read_text(path, CONFIG_BYTES, "a sweep spec")
        if path.suffix == ".toml":
            spec = tomllib.loads(text)
        else:
            spec = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except FileError as e:
        raise SweepError(str(e)) from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise SweepError(f"sweep spec {path} is not valid {path.suffix[1:] or 'JSON'}: {e}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"sweep spec {path} must be an object")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SweepError(
            f"sweep spec: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(SPEC_KEYS))}"
        )
    _overrides_object(spec.get("base"), "base")
    for key in ("families", "sizes"):
        if not isinstance(spec.get(key), dict) or not spec[key]:
            raise SweepError(f"sweep spec: {key!r} must be a non-empty object of name -> overrides")
        for name, section in spec[key].items():
            if not NAME.fullmatch(name):
                raise SweepError(
                    f"sweep spec: {key} name {name!r} is not allowed: names become directory names and words in "
                    "launch scripts; use letters, digits, '.', '_' and '-' (at most 64, not starting with '.' or '-')"
                )
            _overrides_object(section, f"{key}.{name}")
    for family, section in spec["families"].items():
        per_size = (section or {}).get("sizes", {})
        if not isinstance(per_size, dict) or set(per_size) - set(spec["sizes"]):
            raise SweepError(f"sweep spec: families.{family}.sizes must map sizes of the spec to overrides")
        for size, overrides in per_size.items():
            _overrides_object(overrides, f"families.{family}.sizes.{size}")
    if "budgets" not in spec and "isoflop" not in spec:
        raise SweepError("sweep spec: give 'budgets' (tokens, flops or tokens_per_param) or an 'isoflop' grid")
    budgets = spec.get("budgets", {})
    if not isinstance(budgets, dict) or set(budgets) - set(BUDGET_KINDS):
        raise SweepError(f"sweep spec: 'budgets' takes {', '.join(BUDGET_KINDS)} (lists of numbers)")
    for kind, values in budgets.items():
        _positive_numbers(values, f"budgets.{kind}")
    _positive_int(spec.get("min_steps", 1), "min_steps")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SweepError(f"sweep spec: seed must be a non-negative integer, got {seed!r}")
    iso = spec.get("isoflop")
    if iso is not None:
        if not isinstance(iso, dict) or set(iso) - {"flops", "per_budget", "tokens_per_param"} or "flops" not in iso:
            raise SweepError("sweep spec: 'isoflop' takes flops (a list), per_budget and tokens_per_param")
        _positive_numbers(iso["flops"], "isoflop.flops")
        _positive_int(iso.get("per_budget", 3), "isoflop.per_budget")
        _positive_numbers([iso.get("tokens_per_param", 20)], "isoflop.tokens_per_param")
    return spec


def _overrides(section: dict[str, Any]) -> list[str]:
    """A spec section's overrides as ``--set`` strings; the preset (``model``) first."""
    items = sorted(section.items(), key=lambda kv: kv[0] != "model")
    return [f"{key}={json.dumps(value)}" for key, value in items]


def _config(spec: dict[str, Any], family: str, size: str) -> TrainConfig:
    own = dict(spec["families"][family] or {})
    per_size = own.pop("sizes", {})  # the family's own overrides for some sizes (a LowRank rank, say)
    if not isinstance(per_size, dict) or set(per_size) - set(spec["sizes"]):
        raise SweepError(f"sweep spec: families.{family}.sizes must map sizes of the spec to overrides")
    overrides = [*_overrides(spec.get("base", {})), *_overrides(own), *_overrides(spec["sizes"][size] or {}),
                 *_overrides(per_size.get(size) or {}), f"seed={int(spec.get('seed', 0))}"]  # fmt: skip
    try:
        return _train_config(overrides)
    except (ConfigError, TypeError, ValueError) as e:
        raise SweepError(f"sweep run {family}/{size}: {e}") from None


def _train_config(overrides: list[str]) -> TrainConfig:
    d = apply_overrides(TrainConfig().to_dict(), overrides)
    # the token budget is each run's own (set by plan); a placeholder lets the rest validate now
    return TrainConfig.from_dict({**d, "max_tokens": 1})


def _counts(cfg: TrainConfig) -> tuple[int, int, float]:
    """Parameters (total and non-embedding) and training FLOPs per token of a config."""
    return *param_counts(cfg.model), train_flops_per_token(cfg.model, cfg.data.seq_len)


def _active(cfg: TrainConfig) -> int:
    """The parameters a token uses (a mixture of experts' idle experts left out): what a
    tokens-per-parameter ratio counts, as the FLOPs do."""
    return active_params(cfg.model)


def plan(spec: dict[str, Any]) -> list[PlannedRun]:
    """Every run of the spec, with its size, tokens and FLOPs; raises :class:`SweepError` for a
    config that cannot be built or a budget too small for one optimizer step."""
    runs: list[PlannedRun | None] = []
    min_steps = int(spec.get("min_steps", 1))  # a budget buying a size fewer steps leaves that run out
    shapes = {(f, s): _config(spec, f, s) for f in spec["families"] for s in spec["sizes"]}
    counts = {key: _counts(cfg) for key, cfg in shapes.items()}  # (params, non-embedding, FLOPs per token)
    for (family, size), cfg in shapes.items():
        params, non_embedding, per_token = counts[(family, size)]
        for kind, values in spec.get("budgets", {}).items():
            for value in values:
                tokens = {"tokens": value, "flops": value / per_token, "tokens_per_param": value * _active(cfg)}[kind]
                label = {"tokens": "t", "flops": "c", "tokens_per_param": "r"}[kind] + f"{value:.3g}"
                runs.append(_planned(family, size, label, cfg, params, non_embedding, tokens, per_token, min_steps))
    iso = spec.get("isoflop")
    if iso:
        ratio, keep = float(iso.get("tokens_per_param", 20)), int(iso.get("per_budget", 3))
        for budget in iso["flops"]:
            for family in spec["families"]:
                # the sizes nearest the one whose tokens at this ratio spend the budget: C = per_token * ratio * N
                def distance(size: str, family: str = family, budget: float = budget) -> float:
                    per_token = counts[(family, size)][2]
                    return abs(math.log(_active(shapes[(family, size)]) * per_token * ratio / budget))

                for size in sorted(spec["sizes"], key=distance)[:keep]:
                    params, non_embedding, per_token = counts[(family, size)]
                    runs.append(_planned(family, size, f"iso{budget:.3g}", shapes[(family, size)], params,
                                         non_embedding, budget / per_token, per_token, min_steps))  # fmt: skip
    runs = [r for r in runs if r is not None]
    if not runs:
        raise SweepError(f"sweep spec: no run has {min_steps} steps or more")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SweepError("sweep spec: two runs share a name (a budget listed twice?)")
    return runs


def _planned(family, size, label, cfg, params, non_embedding, tokens, per_token, min_steps) -> PlannedRun | None:
    """The run, or None when the spec's ``min_steps`` leaves it out."""
    per_step = cfg.data.seq_len * cfg.data.batch_size * cfg.data.grad_accum
    steps = int(tokens // per_step)
    name = f"{family}-{size}-{label}"
    if steps < min_steps and min_steps > 1:
        return None
    if steps < 1:
        raise SweepError(f"sweep run {name}: a budget of {tokens:.3g} tokens is less than one step ({per_step} tokens)")
    tokens = steps * per_step
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "max_tokens": tokens, "max_steps": None, "max_flops": None})
    return PlannedRun(name, family, size, label, cfg, params, non_embedding, tokens, steps, tokens * per_token)


def describe(runs: list[PlannedRun]) -> str:
    """The ``--dry-run`` table."""
    lines = [f"{'run':<34} {'params':>10} {'non-emb':>10} {'tokens':>10} {'steps':>7} {'FLOPs':>10} {'6ND':>10}"]
    for r in runs:
        lines.append(f"{r.name:<34} {r.params:>10,} {r.non_embedding_params:>10,} {r.tokens:>10.3g} {r.steps:>7} "
                     f"{r.flops:>10.3g} {6 * r.params * r.tokens:>10.3g}")  # fmt: skip
    total = sum(r.flops for r in runs)
    lines.append(f"{len(runs)} runs, {total:.3g} training FLOPs in all")
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run_one(run: PlannedRun, out: Path) -> dict[str, Any]:
    """Train one planned run (resuming it if a killed attempt left a checkpoint; skipped if done)
    and write its row of the results table to ``RUN/result.json``."""
    from griffon.train.trainer import train

    directory = Run(out / "runs" / run.name)
    done = directory.result
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    result = train(run.config, directory, resume=directory.exists())
    row = {
        "run": run.name, "family": run.family, "size": run.size, "budget": run.budget,
        "config_hash": run.config_hash, "params": run.params, "non_embedding_params": run.non_embedding_params,
        "active_params": active_params(run.config.model), "ffn_params": ffn_params(run.config.model), "flops": result.flops, "flops_6nd": 6 * run.params * result.tokens,
        "tokens": result.tokens, "steps": result.steps, "val_loss": result.val_loss, "val_bpb": result.val_bpb,
        "wall_s": time.perf_counter() - started, "tokens_per_s": result.tokens_per_s,
        "device": _device(run.config.device), "seed": run.config.seed, "git_commit": _git_commit(),
    }  # fmt: skip
    if _is_main():
        atomic_write(done, lambda tmp: tmp.write_text(json.dumps(row, indent=2) + "\n"))
    return row


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _device(name: str) -> str:
    from griffon.machine import device_name
    from griffon.train.parallelize import resolve_device

    return device_name(resolve_device(name))


def prepare_shared_data(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Runs that read the embedded corpus share one prepared copy, ``DIR/data``, rather than
    preparing it once per run: the spec with ``data.path`` set to it."""
    base = dict(spec.get("base", {}))
    if "data.path" in base or "data" in base:
        return spec
    from griffon.train.trainer import prepare_data

    cfg = _train_config(_overrides(base))
    data = prepare_data(cfg, TrainingData.resolve(cfg.data.path), out / "data", is_main=_is_main())
    return {**spec, "base": {**base, "data.path": str(data.resolve())}}


def _spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (starting with =, +, -, @, a tab or a
    carriage return) behind a quote, as OWASP advises for CSV files; numbers as they are."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def collect(runs: list[PlannedRun], out: Path) -> list[dict[str, Any]]:
    """The finished runs' rows, written to ``DIR/results.csv`` (and ``results.parquet`` with pyarrow)."""
    rows = []
    for run in runs:
        path = Run(out / "runs" / run.name).result
        if path.is_file():
            rows.append(json.loads(path.read_text()))

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows({k: _spreadsheet_safe(v) for k, v in row.items()} for row in rows)

    atomic_write(out / "results.csv", write_csv)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return rows
    table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in COLUMNS})
    atomic_write(out / "results.parquet", lambda tmp: pq.write_table(table, tmp))
    return rows


# Every value in a launch script is a shell word quoted with shlex.quote ({spec}, {out}, {run},
# {log}); run names are also checked (RUN_NAME) before they get here.
TORCHRUN = """#!/usr/bin/env bash
# {name}: {params:,} parameters, {tokens:.3g} tokens, {flops:.3g} FLOPs. Rerunning resumes it.
set -euo pipefail
torchrun --standalone --nproc_per_node="${{NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}}" \\
    -m griffon.cli sweep {spec} --out {out} --run {run}
"""

SLURM = """#!/usr/bin/env bash
#SBATCH --job-name={name}
#SBATCH --nodes=${{NODES:-1}}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${{GPUS_PER_NODE:-8}}
#SBATCH --output={log}
# {name}: {params:,} parameters, {tokens:.3g} tokens, {flops:.3g} FLOPs. Resubmitting resumes it.
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$SLURM_GPUS_PER_NODE" \\
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_node:29500" \\
    -m griffon.cli sweep {spec} --out {out} --run {run}
"""


def emit(runs: list[PlannedRun], spec_path: Path, out: Path, kind: str) -> list[Path]:
    """One launch script per run under ``DIR/launch/`` (``torchrun`` or ``slurm``)."""
    template = {"torchrun": TORCHRUN, "slurm": SLURM}[kind]
    paths = []
    for run in runs:
        if not RUN_NAME.fullmatch(run.name):  # built from checked parts; this guards the script
            raise SweepError(f"run name {run.name!r} cannot go into a launch script")
        log = shlex.quote(str(out.resolve() / "launch" / f"{run.name}.%j.log"))
        text = template.format(name=run.name, params=run.params, tokens=run.tokens, flops=run.flops,
                               spec=shlex.quote(str(spec_path.resolve())), out=shlex.quote(str(out.resolve())),
                               run=shlex.quote(run.name), log=log)  # fmt: skip
        path = out / "launch" / f"{run.name}.{'sbatch' if kind == 'slurm' else 'sh'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
        path.chmod(0o755)
        paths.append(path)
    return paths


def sweep(spec_path: str | Path, out: str | Path, dry_run: bool = False, emit_kind: str | None = None,
          only: str | None = None, collect_only: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Plan the spec's runs and do what was asked: list them, write launch scripts, train one
    (``only``), gather the table, or train every unfinished run in turn and gather the table."""
    spec_path, out = Path(spec_path), Path(out)
    spec = load_spec(spec_path)
    runs = plan(spec)  # every run checked before anything runs
    if dry_run:
        print(describe(runs))
        return []
    if emit_kind:
        for path in emit(runs, spec_path, out, emit_kind):
            print(path)
        print(f"then: griffon sweep {spec_path} --out {out} --collect")
        return []
    if collect_only:
        rows = collect(runs, out)
        print(f"{len(rows)} of {len(runs)} runs finished; table in {out / 'results.csv'}")
        return rows
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(prepare_shared_data(spec, out))
    if only is not None:
        chosen = [r for r in runs if r.name == only]
        if not chosen:
            raise SweepError(f"no run named {only!r} in {spec_path}; --dry-run lists them")
        return [run_one(chosen[0], out)]
    for i, run in enumerate(runs, 1):
        row = run_one(run, out)
        print(f"[{i}/{len(runs)}] {run.name}: val loss {row['val_loss']}, {row['wall_s']:.0f} s", file=sys.stderr)
    rows = collect(runs, out)
    print(f"{len(rows)} runs; table in {out / 'results.csv'}")
    return rows
