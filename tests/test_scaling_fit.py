"""Scaling-law fits: known laws recovered from noisy synthetic runs within their bootstrap
intervals; bad tables and failed fits stop with one clear line."""

import csv
import json
import math

import numpy as np
import pytest

pytest.importorskip("scipy")

from griffon.cli import main  # noqa: E402
from griffon.scaling import fit as fit_module  # noqa: E402
from griffon.scaling.fit import (  # noqa: E402
    Runs,
    ScalingFitError,
    fit_family,
    fit_frontier,
    fit_isoflop,
    frontier,
    read_runs,
)

TRUE = {"E": 1.8, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.28}


def _synthetic(noise=0.005, seed=0, budgets=(1e15, 3e15, 1e16, 3e16, 1e17), sizes=7):
    """Runs on IsoFLOP grids drawn from L(N, D) = E + A/N^alpha + B/D^beta with log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for n in np.geomspace(1e6, 1e8, sizes):
            d = c / (6 * n)
            loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
            rows.append((n, d, loss * math.exp(rng.normal(0, noise))))
    n, d, loss = map(np.array, zip(*rows, strict=True))
    return Runs(n, d, loss, 6 * n * d, np.array(["x"] * len(loss), dtype=object))


def _write(path, header, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_parametric_law_recovered_within_its_intervals():
    fit = fit_family(_synthetic(), bootstrap=30, fit_starts=32)["parametric"]
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    for key, value in {**TRUE, "a": a_true, "b": 1 - a_true}.items():
        lo, hi = fit["intervals"][key]
        assert lo <= value <= hi, (key, value, lo, hi)
        assert lo <= fit[key] <= hi
    assert fit["bootstrap"] == {"resamples": 30, "failed": 0, "level": 0.95}
    # the intervals are informative, not the whole parameter range
    assert fit["intervals"]["beta"][1] - fit["intervals"]["beta"][0] < 0.05


def test_frontier_keeps_only_runs_no_cheaper_run_beats():
    runs = Runs(*(np.array(v, dtype=float) for v in ([1] * 5, [1] * 5, [5, 4, 4.5, 3, 3.2], [1, 2, 3, 4, 5])),
                np.array(["x"] * 5, dtype=object))  # fmt: skip
    assert frontier(runs).tolist() == [0, 1, 3]


def test_frontier_power_law_recovered():
    rng = np.random.default_rng(1)
    c = np.geomspace(1e14, 1e19, 12)
    loss = (2.0 + 3e3 * c**-0.2) * np.exp(rng.normal(0, 1e-3, c.size))
    runs = Runs(np.ones_like(c), np.ones_like(c), loss, c, np.array(["x"] * c.size, dtype=object))
    fit = fit_frontier(runs)
    assert fit["E"] == pytest.approx(2.0, rel=0.05) and fit["alpha"] == pytest.approx(0.2, rel=0.05)


def _planted_parabolas(flops_per_nd: float) -> Runs:
    """Exact parabolas of loss in log N around N*(C) = 0.1 C^0.5, at budgets C = flops_per_nd N D."""
    rows = []
    for c in (1e15, 1e16, 1e17):
        n_opt = 0.1 * c**0.5
        for n in n_opt * np.geomspace(0.2, 5, 5):
            rows.append((n, c / (flops_per_nd * n), 3.0 + 0.05 * math.log(n / n_opt) ** 2, c))
    n, d, loss, c = map(np.array, zip(*rows, strict=True))
    return Runs(n, d, loss, c, np.array(["x"] * len(loss), dtype=object))


def test_isoflop_minima_follow_the_planted_power_law():
    """Exact parabolas in log N around N*(C) = 0.1 C^0.5: the fit finds N* and the exponent."""
    fit = fit_isoflop(_planted_parabolas(flops_per_nd=6))
    assert fit["a"] == pytest.approx(0.5, abs=1e-6) and fit["k"] == pytest.approx(0.1, rel=1e-4)
    assert [p["n_opt"] for p in fit["profiles"]] == pytest.approx([0.1 * c**0.5 for c in (1e15, 1e16, 1e17)])


def test_command_writes_fits_and_plot(tmp_path, capsys):
    runs = _synthetic(budgets=(1e15, 1e16, 1e17), sizes=5)
    rows = [("griffin", n, d, loss) for n, d, loss in zip(runs.params, runs.tokens, runs.loss, strict=True)]
    rows += [("hawk", n, d, loss * 1.02) for n, d, loss in zip(runs.params, runs.tokens, runs.loss, strict=True)]
    _write(tmp_path / "runs.csv", ["model", "N", "tokens", "val_loss"], rows)
    argv = ["scaling", "fit", str(tmp_path / "runs.csv"), "--family-column", "model", "--params-column", "N",
            "--loss-column", "val_loss", "--bootstrap", "3", "--json", str(tmp_path / "fit.json"),
            "--png", str(tmp_path / "fit.png"), "--exclude-top-loss", "1", "--starts", "32"]  # fmt: skip
    assert main(argv) == 0
    fits = json.loads((tmp_path / "fit.json").read_text())
    assert set(fits) == {"griffin", "hawk"} and fits["griffin"]["runs"] == 14  # 15 less the worst
    best = {round(math.log10(b["flops"])): b for b in fits["hawk"]["budgets"]}
    group = [(loss * 1.02, n) for n, d, loss in zip(runs.params, runs.tokens, runs.loss, strict=True)][5:10]
    assert (best[16]["loss"], best[16]["params"]) == pytest.approx(min(group))  # the 1e16 budget's best run
    assert "parametric: E" in capsys.readouterr().out
    assert (tmp_path / "fit.png").stat().st_size > 0


def test_bad_tables_give_one_line(tmp_path, capsys):
    cases = {
        "missing.csv": (["params", "loss"], [(1, 2)], "no column tokens"),
        "zero.csv": (["params", "tokens", "loss"], [(1e6, 0, 3.0)], "tokens must be positive"),
        "text.csv": (["params", "tokens", "loss"], [(1e6, "many", 3.0)], "not a number"),
        "few.csv": (["params", "tokens", "loss"], [(1e6 * i, 1e8, 3.0) for i in range(1, 4)], "at least 5"),
    }
    for name, (header, rows, message) in cases.items():
        _write(tmp_path / name, header, rows)
        assert main(["scaling", "fit", str(tmp_path / name), "--bootstrap", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (name, err)
    assert main(["scaling", "fit", str(tmp_path / "absent.csv")]) == 2


def test_a_fit_that_never_converges_says_so(monkeypatch, capsys):
    """A fit that fails is reported as such beside the ones that worked; if all fail, one error."""
    from griffon.scaling.fit import fit_parametric, summary

    class Failed:
        success, x, fun = False, np.zeros(5), 0.0

    monkeypatch.setattr("scipy.optimize.minimize", lambda *a, **k: Failed())
    runs = _synthetic(budgets=(1e16, 1e17), sizes=5)  # sizes that bracket both budgets' optima
    with pytest.raises(ScalingFitError, match="L\\(N, D\\) did not converge"):
        fit_parametric(runs)
    fits = fit_family(runs, bootstrap=0)
    assert "did not converge" in fits["parametric"]["error"] and "a" in fits["isoflop"]
    assert "parametric: the parametric fit L(N, D) did not converge" in summary({"x": fits})
    with pytest.raises(ScalingFitError, match="no fit succeeded"):
        fit_family(_synthetic(budgets=(1e15,), sizes=5), bootstrap=0)


def test_read_runs_defaults_flops_to_6nd(tmp_path):
    _write(tmp_path / "r.csv", ["params", "tokens", "loss"], [(2e6, 3e8, 3.1)])
    runs = read_runs(tmp_path / "r.csv")
    assert runs.flops.tolist() == [6 * 2e6 * 3e8] and runs.family.tolist() == ["all"]


def test_isoflop_leaves_out_budgets_whose_sizes_miss_the_optimum():
    rows = []
    for c, shift in ((1e15, 1.0), (1e16, 1.0), (1e17, 30.0)):  # the last budget's sizes all lie above N*
        n_opt = 0.1 * c**0.5
        for n in n_opt * shift * np.geomspace(0.2, 5, 5):
            rows.append((n, c / (6 * n), 3.0 + 0.05 * math.log(n / n_opt) ** 2, c))
    n, d, loss, c = map(np.array, zip(*rows, strict=True))
    fit = fit_isoflop(Runs(n, d, loss, c, np.array(["x"] * len(loss), dtype=object)))
    assert len(fit["profiles"]) == 2 and fit["unbracketed_budgets"] == pytest.approx([1e17])
    assert fit["a"] == pytest.approx(0.5, abs=1e-6)


def _huber_sum(theta, runs) -> float:
    """The summed Huber loss (delta 1e-3) of log L at ``theta`` against the runs, written out."""
    log_e, log_a, log_b, alpha, beta = theta
    total = 0.0
    for n, d, loss in zip(runs.params, runs.tokens, runs.loss, strict=True):
        r = math.log(math.exp(log_e) + math.exp(log_a) / n**alpha + math.exp(log_b) / d**beta) - math.log(loss)
        total += 0.5 * r * r if abs(r) <= 1e-3 else 1e-3 * (abs(r) - 0.5e-3)
    return total


def test_the_huber_fit_ignores_outliers_and_reports_its_summed_loss():
    """Runs exactly on the law but for four pushed 5% up: a Huber fit with delta 1e-3 (a linear
    penalty past 1e-3) keeps the law; least squares, or a larger delta, would be pulled toward the
    outliers. The reported objective is the Huber loss summed over the runs at the fit."""
    from griffon.scaling.fit import fit_parametric

    runs = _synthetic(noise=0.0)
    loss = runs.loss.copy()
    loss[[3, 10, 17, 24]] *= math.exp(0.05)
    runs = Runs(runs.params, runs.tokens, loss, runs.flops, runs.family)
    fit = fit_parametric(runs, keep=32)
    for key in ("E", "alpha", "beta"):
        assert fit[key] == pytest.approx(TRUE[key], rel=0.02), (key, fit[key])
    assert fit["objective"] == pytest.approx(_huber_sum(fit["theta"], runs), rel=1e-9)


def test_the_grid_evaluation_takes_bounded_memory_whatever_the_runs():
    from griffon.scaling.fit import PARAMETRIC_GRID, grid_objective

    from memory import peak_traced_bytes

    rng = np.random.default_rng(0)
    xs = np.log(np.stack([rng.uniform(1e6, 1e9, 3000), rng.uniform(1e8, 1e11, 3000)]))
    log_l = np.log(rng.uniform(2, 4, 3000))
    small = grid_objective(PARAMETRIC_GRID, xs[:, :50], log_l[:50])
    reference = [grid_objective(PARAMETRIC_GRID, xs[:, i : i + 1], log_l[i : i + 1]) for i in range(50)]
    assert np.allclose(small, np.sum(reference, axis=0), rtol=1e-12)
    peak = peak_traced_bytes(lambda: grid_objective(PARAMETRIC_GRID, xs, log_l))
    # all at once: 4500 points x 3 terms x 3000 runs x 8 bytes = 324 MB per temporary
    assert peak < 256 * 2**20, peak


def _table(path, runs, family=None, bom=False):
    rows = [(family or r_family, n, d, loss) for n, d, loss, r_family in
            zip(runs.params, runs.tokens, runs.loss, runs.family, strict=True)]  # fmt: skip
    _write(path, ["family", "params", "tokens", "loss"], rows)
    if bom:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def test_a_family_that_cannot_be_fitted_is_skipped_and_named(tmp_path, capsys):
    good = _synthetic(budgets=(1e16, 1e17), sizes=5)
    _table(tmp_path / "a.csv", good, family="good")
    with (tmp_path / "a.csv").open("a", newline="") as f:
        csv.writer(f).writerows([("tiny", 1e6, 1e8, 3.0), ("tiny", 2e6, 1e8, 2.9)])
    assert (
        main(
            [
                "scaling",
                "fit",
                str(tmp_path / "a.csv"),
                "--bootstrap",
                "0",
                "--starts",
                "32",
                "--json",
                str(tmp_path / "f.json"),
            ]
        )
        == 0  # fmt: skip
    )
    out = capsys.readouterr().out
    assert "tiny: skipped (2 runs; a scaling fit needs at least 5)" in out and "good (" in out
    fits = json.loads((tmp_path / "f.json").read_text())
    assert fits["tiny"] == {"skipped": "2 runs; a scaling fit needs at least 5"} and "parametric" in fits["good"]


def test_identical_runs_are_undetermined_not_fitted(tmp_path, capsys):
    _write(tmp_path / "same.csv", ["params", "tokens", "loss"], [(1e6, 1e8, 3.0)] * 8)
    assert main(["scaling", "fit", str(tmp_path / "same.csv"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "L(N, D) is undetermined" in err and "these runs have 1" in err


def test_the_json_is_valid_whatever_the_values(tmp_path, capsys):
    from griffon.scaling.fit import finite_json

    assert finite_json({"a": [1.0, float("inf")], "b": {"c": float("nan")}, "d": "x"}) == {
        "a": [1.0, None], "b": {"c": None}, "d": "x"
    }  # fmt: skip
    runs = _synthetic(budgets=(1e16, 1e17), sizes=5)
    rows = [(n * 1e190, d * 1e190, loss) for n, d, loss in zip(runs.params, runs.tokens, runs.loss, strict=True)]
    _write(tmp_path / "huge.csv", ["params", "tokens", "loss"], rows)  # some fitted quantities overflow here
    argv = ["scaling", "fit", str(tmp_path / "huge.csv"), "--bootstrap", "0", "--json", str(tmp_path / "h.json")]
    assert main(argv) == 0
    capsys.readouterr()
    text = (tmp_path / "h.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert "null" in text  # what overflowed is written as null


def test_a_byte_order_mark_keeps_the_family_column(tmp_path):
    _table(tmp_path / "bom.csv", _synthetic(sizes=5), family="griffin", bom=True)
    assert set(read_runs(tmp_path / "bom.csv").family) == {"griffin"}


def test_the_point_estimate_starts_from_every_grid_point_and_the_bootstrap_from_the_best(monkeypatch):
    """L-BFGS runs from all 4,500 grid points (75 for the frontier) for the fit itself, and from
    the :data:`BOOTSTRAP_STARTS` best on each resample."""
    calls = []
    original = fit_module._lbfgs

    def counting(objective, starts, args, bounds):
        calls.append(len(starts))
        return original(objective, starts[:1], args, bounds)  # one start is enough to go on

    monkeypatch.setattr(fit_module, "_lbfgs", counting)
    fit_family(_synthetic(), bootstrap=2)
    assert calls == [len(fit_module.PARAMETRIC_GRID), len(fit_module.FRONTIER_GRID)] + [fit_module.BOOTSTRAP_STARTS] * 4
    assert len(fit_module.PARAMETRIC_GRID) == 4500


def test_isoflop_reads_the_optimal_tokens_from_the_runs_when_flops_are_exact_counts():
    """FLOPs counted exactly (here 7.8 N D, attention and all) rather than 6ND: D*(C) is the
    tokens the runs trained at N*, C / (7.8 N*), not C / (6 N*)."""
    fit = fit_isoflop(_planted_parabolas(flops_per_nd=7.8))
    for p in fit["profiles"]:
        assert p["d_opt"] == pytest.approx(p["flops"] / (7.8 * p["n_opt"]), rel=1e-9)
    assert fit["b"] == pytest.approx(0.5, abs=1e-6)


def test_the_chinchilla_points_give_the_replications_law():
    """On the 240 Chinchilla runs Besiroglu et al. 2024 fitted (the 5 highest-loss left out), the
    fit gives their published estimates, Table 1: E 1.82, A 482.01, B 2085.43, alpha 0.3478,
    beta 0.3658 (the best 32 starts give the every-start fit here; experiments/fit_checks.py)."""
    from pathlib import Path

    runs = read_runs(Path(__file__).parent / "data" / "chinchilla_points.csv", exclude_top_loss=5)
    fit = fit_module.fit_parametric(runs, keep=32)
    assert len(runs) == 240
    assert fit["E"] == pytest.approx(1.82, rel=5e-3)
    assert fit["alpha"] == pytest.approx(0.3478, rel=5e-3) and fit["beta"] == pytest.approx(0.3658, rel=5e-3)
    # A and B trade off along a ridge of the objective: their 95% intervals span factors of 2 and 6
    assert fit["A"] == pytest.approx(482.01, rel=0.03) and fit["B"] == pytest.approx(2085.43, rel=0.03)
