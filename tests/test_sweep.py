"""``griffon sweep``: a 3-run sweep end to end, resumable; dry run, launch scripts, collection;
bad specs refused with one line before anything runs."""

import csv
import json
import subprocess

import pytest

from griffon.cli import main
from griffon.scaling.sweep import load_spec, plan

BASE = {"max_minutes": None, "data.seq_len": 32, "data.batch_size": 2, "eval_every": 1000, "save_every": 1000,
        "log_every": 1000, "final_eval_batches": 2}  # fmt: skip


def _spec(tmp_path, **changes):
    spec = {"base": BASE, "families": {"griffin": {"model": "griffin-tiny"}},
            "sizes": {"w32": {"model.width": 32, "model.mlp_width": 96}},
            "budgets": {"tokens": [640], "flops": [3e8], "tokens_per_param": [0.02]}} | changes  # fmt: skip
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _rows(out):
    with (out / "results.csv").open() as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_three_run_sweep_resumes_and_skips(tmp_path, monkeypatch):
    spec, out = _spec(tmp_path), tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    rows = _rows(out)
    planned = {r.name: r for r in plan(load_spec(spec))}
    assert set(rows) == set(planned) and len(rows) == 3
    for name, row in rows.items():
        run = planned[name]
        assert int(row["tokens"]) == run.tokens and int(row["steps"]) == run.steps
        assert float(row["flops"]) == pytest.approx(run.flops, rel=1e-9)  # exact accounting, as planned
        assert float(row["flops_6nd"]) == 6 * int(row["params"]) * run.tokens
        assert float(row["val_loss"]) > 0 and float(row["val_bpb"]) > 0 and row["config_hash"]
    assert rows["griffin-w32-t640"]["tokens"] == "640"
    # a killed run (its result missing) resumes from its checkpoint; finished runs are not touched
    (out / "runs" / "griffin-w32-t640" / "result.json").unlink()
    import griffon.train.trainer

    calls = []
    train = griffon.train.trainer.train
    monkeypatch.setattr(griffon.train.trainer, "train", lambda cfg, d, resume: (calls.append((d.root.name, resume)), train(cfg, d, resume))[1])  # fmt: skip
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert calls == [("griffin-w32-t640", True)]
    again = _rows(out)
    assert again["griffin-w32-t640"]["val_loss"] == rows["griffin-w32-t640"]["val_loss"]


def test_dry_run_and_launch_scripts(tmp_path, capsys):
    spec, out = _spec(tmp_path), tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "griffin-w32-t640" in printed and "3 runs" in printed and not out.exists()
    for kind, suffix, needle in (("torchrun", "sh", "torchrun --standalone"), ("slurm", "sbatch", "srun torchrun")):
        assert main(["sweep", str(spec), "--out", str(out), "--emit", kind]) == 0
        scripts = sorted((out / "launch").glob(f"*.{suffix}"))
        assert len(scripts) == 3
        text = scripts[0].read_text()
        assert needle in text and f"--run {scripts[0].stem}" in text
        assert subprocess.run(["bash", "-n", str(scripts[0])]).returncode == 0
    assert main(["sweep", str(spec), "--out", str(out), "--collect"]) == 0
    assert _rows(out) == {}


def test_one_run_by_name(tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out), "--run", "griffin-w32-t640"]) == 0
    assert [p.name for p in (out / "runs").iterdir()] == ["griffin-w32-t640"]
    assert main(["sweep", str(spec), "--out", str(out), "--collect"]) == 0
    assert list(_rows(out)) == ["griffin-w32-t640"]


def test_isoflop_grid_picks_sizes_around_the_guess(tmp_path):
    """A budget at which 20 tokens per parameter is exactly width 64's: it and a neighbour train,
    each for the tokens the budget buys it, to the step."""
    import torch

    from griffon import Griffon
    from griffon.accounting import train_flops_per_token
    from griffon.config import ModelConfig

    sizes = {f"w{w}": {"model.width": w, "model.mlp_width": 3 * w} for w in (16, 32, 64, 128)}
    w64 = ModelConfig.from_dict({**plan(load_spec(_spec(tmp_path)))[0].config.model.to_dict(), "width": 64,
                                 "mlp_width": 192})  # fmt: skip
    with torch.device("meta"):
        params = Griffon(w64).num_params()
    budget = 20 * params * train_flops_per_token(w64, BASE["data.seq_len"])
    runs = plan(load_spec(_spec(tmp_path, sizes=sizes, budgets={}, isoflop={"flops": [budget], "per_budget": 2})))
    assert len(runs) == 2 and sorted(r.size for r in runs) in (["w32", "w64"], ["w128", "w64"])
    for r in runs:
        assert budget - r.flops / r.steps < r.flops <= budget
    (chosen,) = [r for r in runs if r.size == "w64"]
    assert chosen.tokens == pytest.approx(20 * params, abs=64)


def test_family_overrides_per_size(tmp_path):
    """A family may add overrides for some sizes, applied after the size's own (a LowRank rank
    that follows the width, say)."""
    families = {"dense": {"model": "griffin-tiny"},
                "lowrank": {"model": "griffin-tiny", "model.ffn_structure.kind": "lowrank",
                            "sizes": {"w32": {"model.ffn_structure.rank": 8}}}}  # fmt: skip
    runs = {r.family: r for r in plan(load_spec(_spec(tmp_path, families=families, budgets={"tokens": [640]})))}
    assert runs["lowrank"].config.model.ffn_structure.rank == 8 and runs["lowrank"].config.model.width == 32
    assert runs["dense"].config.model.ffn_structure.kind == "dense"
    assert runs["lowrank"].params < runs["dense"].params


def test_min_steps_leaves_out_short_runs(tmp_path):
    """``min_steps``: a budget that buys a size fewer steps is not run for that size (and a budget
    below one step is then no error); the others are planned as without it."""
    sizes = {f"w{w}": {"model.width": w, "model.mlp_width": 3 * w} for w in (16, 64)}
    spec = {"sizes": sizes, "budgets": {"tokens": [10, 640, 6400]}}
    every = {r.name: r for r in plan(load_spec(_spec(tmp_path, sizes=sizes, budgets={"tokens": [640, 6400]})))}
    kept = {r.name: r for r in plan(load_spec(_spec(tmp_path, **spec, min_steps=50)))}
    assert set(kept) == {n for n, r in every.items() if r.steps >= 50} and len(kept) == 2
    assert all(kept[n].tokens == every[n].tokens for n in kept)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"budgets": {"tokens": [10]}}, "less than one step"),
        ({"families": {"griffin": {"model": "grifin-tiny"}}}, "did you mean 'griffin-tiny'"),
        ({"sizes": {"odd": {"model.width": 33}}}, "sweep run griffin/odd"),
        ({"famlies": {}}, "unknown key(s) famlies"),
        ({"budgets": {"steps": [3]}}, "'budgets' takes tokens, flops, tokens_per_param"),
        ({"families": {}}, "'families' must be a non-empty object"),
        ({"min_steps": 0}, "min_steps must be a positive integer"),
        ({"min_steps": 10**6}, "no run has 1000000 steps or more"),
        ({"seed": [1]}, "seed must be a non-negative integer"),
        ({"sizes": {"w": [1]}}, "sizes.w must be an object of train-config overrides"),
        ({"families": {"g": 5}}, "families.g must be an object of train-config overrides"),
        ({"base": "x"}, "base must be an object of train-config overrides"),
        ({"isoflop": {"flops": 5}}, "isoflop.flops must be a non-empty list of positive finite numbers"),
        ({"isoflop": {"flops": [1e12], "per_budget": -1}}, "isoflop.per_budget must be a positive integer"),
        ({"budgets": {"tokens": [float("inf")]}}, "Infinity is not a number a budget can be"),
        (
            {"families": {"g\ntouch PWNED\n#": {"model": "griffin-tiny"}}},
            "families name 'g\\ntouch PWNED\\n#' is not allowed",
        ),
        (
            {"families": {"../../../escaped": {"model": "griffin-tiny"}}},
            "families name '../../../escaped' is not allowed",
        ),
        ({"sizes": {"..": {"model.width": 32}}}, "sizes name '..' is not allowed"),
    ],
    ids=[
        "budget-too-small",
        "unknown-preset",
        "impossible-size",
        "unknown-key",
        "unknown-budget",
        "no-family",
        "bad-min-steps",
        "every-run-too-short",
        "seed-not-int",
        "size-not-object",
        "family-not-object",
        "base-not-object",
        "isoflop-not-list",
        "negative-per-budget",
        "infinite-budget",
        "shell-in-name",
        "path-in-name",
        "dotdot-name",
    ],  # fmt: skip
)
def test_bad_specs_refused_before_anything_runs(tmp_path, capsys, changes, message):
    out = tmp_path / "sweep"
    assert main(["sweep", str(_spec(tmp_path, **changes)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not out.exists()


def test_duplicate_keys_are_refused(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(_spec(tmp_path).read_text()[:-1] + ', "seed": 1, "seed": 2}')
    assert main(["sweep", str(path), "--out", str(tmp_path / "sweep")]) == 2
    assert "key 'seed' appears twice" in capsys.readouterr().err


def test_nothing_planted_in_names_runs_or_lands_outside_out(tmp_path, capsys):
    """A family named to run a command, or to climb out of --out, is refused before anything is
    written; and every value in a launch script is quoted, so an --out path with shell syntax in
    it reaches torchrun as one word and runs nothing."""
    for family in ("g\ntouch PWNED\n#", "../../../escaped"):
        spec = _spec(tmp_path, families={family: {"model": "griffin-tiny"}})
        for extra in ([], ["--emit", "torchrun"], ["--emit", "slurm"]):
            assert main(["sweep", str(spec), "--out", str(tmp_path / "sweep"), *extra]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]
    out = tmp_path / "a dir $(touch PWNED) `touch PWNED2`"
    assert main(["sweep", str(_spec(tmp_path)), "--out", str(out), "--emit", "torchrun"]) == 0
    script = sorted((out / "launch").glob("*.sh"))[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RECORD"\n')
    (bin_dir / "torchrun").chmod(0o755)
    record = tmp_path / "argv.txt"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NPROC_PER_NODE": "1", "RECORD": str(record)}
    assert subprocess.run(["bash", str(script)], env=env, cwd=tmp_path).returncode == 0
    argv = record.read_text().splitlines()
    assert argv[argv.index("--out") + 1] == str(out.resolve()) and argv[argv.index("--run") + 1] == script.stem
    assert not list(tmp_path.rglob("PWNED*"))


def test_results_csv_cells_a_spreadsheet_would_run_are_quoted(tmp_path):
    from griffon.scaling.sweep import collect

    spec = load_spec(_spec(tmp_path))
    runs = plan(spec)
    out = tmp_path / "sweep"
    row = {c: 1 for c in ("params", "tokens")} | {"run": runs[0].name, "device": "=HYPERLINK(\"http://x\")",
                                                   "git_commit": "@SUM(1)", "family": "griffin"}  # fmt: skip
    (out / "runs" / runs[0].name).mkdir(parents=True)
    (out / "runs" / runs[0].name / "result.json").write_text(json.dumps(row))
    collect(runs, out)
    (written,) = _rows(out).values()
    assert written["device"] == '\'=HYPERLINK("http://x")' and written["git_commit"] == "'@SUM(1)"
    assert written["family"] == "griffin" and written["params"] == "1"
