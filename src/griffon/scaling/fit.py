"""Scaling-law fits with bootstrap intervals: ``griffon scaling fit RESULTS.csv``.

Three views of one table of training runs (parameters N, tokens D, training FLOPs C, final loss L):

* **Frontier**: the runs no cheaper run beats (lowest loss so far in order of compute), fitted with
  L(C) = E + A C^-alpha.
* **IsoFLOP profiles** (Hoffmann et al. 2022, Approach 2): runs grouped by compute budget, a
  parabola of loss in log N through each group, its minimum N*(C), D*(C) read from the runs' own
  tokens (a line of log D in log N through the group, at N*: C / (6 N*) when the FLOPs are 6ND,
  and right too when they are exact counts), and the power laws N* = k C^a, D* = k' C^b fitted
  through the minima. A budget whose minimum lies
  outside the sizes trained at it is left out (and listed): its optimum is not bracketed.
* **Parametric law** (Approach 3): L(N, D) = E + A / N^alpha + B / D^beta, fitted as Besiroglu et al.
  2024 corrected the original: in log space (log L = LSE(e, a - alpha log N, b - beta log D), with
  E = exp(e), A = exp(a), B = exp(b)), a Huber loss with delta 1e-3 summed over the runs, L-BFGS from
  every point of a grid of initialisations (4,500 points), the best fit kept. The compute-optimal allocation
  follows: N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta)) / G with
  G = (alpha A / (beta B))^(1/(alpha+beta)).

Every parameter gets a percentile bootstrap interval: the runs are resampled with replacement and
each fit repeated; resamples on which a fit is not defined (too few distinct budgets) are counted
and reported, not silently dropped. In the bootstrap, L-BFGS starts from the
:data:`BOOTSTRAP_STARTS` grid points with the lowest objective on each resample, not from all of
them (4,500 starts per resample would take hours): on the Chinchilla points the intervals are the
same at the reported digits with 8 and with 64 starts (``experiments/fit_checks.py``,
docs/scaling.md).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from griffon.atomic import atomic_savefig
from griffon.files import FileError, read_text

# A results table: a row a run, a few hundred bytes each.
TABLE_BYTES = 256 * 2**20

HUBER_DELTA = 1e-3
# Initialisation grid of Hoffmann et al. 2022 (Appendix D.2), as Besiroglu et al. 2024 reran it.
GRID = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
MIN_POINTS = 5
BOOTSTRAP_STARTS = 8
"""L-BFGS starts per bootstrap resample: the grid points with the lowest objective on it."""
DEFAULT_BOOTSTRAP = 200
"""Resamples for the intervals (``griffon scaling fit --bootstrap``); docs/scaling.md measures
how stable the intervals are with it."""
INTERVAL_DIGITS = 2
"""Significant digits the summary gives an interval's ends. Percentile ends are Monte Carlo
estimates: on the Chinchilla runs, three seeds of 200 resamples move them by up to 2.5% for the
exponents and E, 17% for A and B (``experiments/fit_checks.py``); more digits would be noise.
The JSON keeps every digit."""
# Box for L-BFGS: log-coefficients up to 300 (exp(300) is still a float) and exponents up to 10,
# far beyond any real law, so that a flat direction cannot run off to overflow.
LOG_BOUND, EXPONENT_BOUND = (-300.0, 300.0), (0.0, 10.0)


class ScalingFitError(ValueError):
    """The table cannot be fitted: missing columns, bad values, too few runs, no convergence."""


@dataclass
class Runs:
    """One row per training run; ``flops`` defaults to 6 N D where the table has none."""

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray
    family: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, index: np.ndarray) -> Runs:
        return Runs(self.params[index], self.tokens[index], self.loss[index], self.flops[index], self.family[index])


def read_runs(path: str | Path, columns: dict[str, str] | None = None, exclude_top_loss: int = 0) -> Runs:
    """Read a results table (CSV) with columns ``params``, ``tokens``, ``loss`` and optionally
    ``family`` and ``flops`` (``columns`` maps these names to the table's own). Drops the
    ``exclude_top_loss`` highest-loss runs of each family, as Besiroglu et al. drop outliers."""
    columns = {name: name for name in ("params", "tokens", "loss", "flops", "family")} | (columns or {})
    path = Path(path)
    try:
        text = read_text(path, TABLE_BYTES, "a results table").removeprefix("\ufeff")  # a spreadsheet's byte-order mark
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except (FileError, csv.Error) as e:
        raise ScalingFitError(f"cannot read {path}: {e}") from None
    if not rows:
        raise ScalingFitError(f"{path} holds no runs")
    missing = [columns[c] for c in ("params", "tokens", "loss") if columns[c] not in rows[0]]
    if missing:
        raise ScalingFitError(f"{path} has no column {', '.join(missing)} (columns: {', '.join(rows[0])})")

    def number(row: int, name: str) -> float:
        text = rows[row].get(columns[name]) or ""
        try:
            value = float(text)
        except ValueError:
            raise ScalingFitError(f"{path} row {row + 2}: {columns[name]} is {text!r}, not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ScalingFitError(f"{path} row {row + 2}: {columns[name]} must be positive and finite, got {text}")
        return value

    has_flops = columns["flops"] in rows[0]
    params = np.array([number(i, "params") for i in range(len(rows))])
    tokens = np.array([number(i, "tokens") for i in range(len(rows))])
    loss = np.array([number(i, "loss") for i in range(len(rows))])
    flops = np.array([number(i, "flops") for i in range(len(rows))]) if has_flops else 6 * params * tokens
    family = np.array([r.get(columns["family"]) or "all" for r in rows], dtype=object)
    runs = Runs(params, tokens, loss, flops, family)
    if exclude_top_loss:
        keep = np.ones(len(runs), dtype=bool)
        for name in set(family):
            members = np.flatnonzero(family == name)
            keep[members[np.argsort(loss[members])[len(members) - exclude_top_loss :]]] = False
        runs = runs.take(np.flatnonzero(keep))
    return runs


# ----- the parametric law L(N, D) ----------------------------------------------------------------
def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def _log_terms(theta: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The log of each term of L = E + sum_i C_i exp(x_i)^-k_i, both laws' form: ``theta``
    (..., 1 + 2m) holds (log E, log C_1..C_m, k_1..k_m), ``xs`` (m, runs) the log-inputs (log N
    and log D, or log C). Returns (..., 1 + m, runs)."""
    m = xs.shape[0]
    log_e = np.broadcast_to(theta[..., :1, None], (*theta.shape[:-1], 1, xs.shape[1]))
    return np.concatenate([log_e, theta[..., 1 : 1 + m, None] - theta[..., 1 + m :, None] * xs], axis=-2)


def _objective(theta: np.ndarray, xs: np.ndarray, log_l: np.ndarray) -> tuple[float, np.ndarray]:
    """The Huber loss of log L = LSE(terms) against the runs' log-losses, summed, and its gradient."""
    terms = _log_terms(theta, xs)  # (1 + m, runs)
    lse = np.logaddexp.reduce(terms, axis=0)
    weights = np.exp(terms - lse)  # d lse / d term
    value, slope = _huber(lse - log_l, HUBER_DELTA)
    grad_logs = (slope * weights).sum(-1)  # log E and each log C_i
    grad_exponents = -(slope * weights[1:] * xs).sum(-1)
    return value.sum(), np.concatenate([grad_logs, grad_exponents])


# Bytes of one block of the grid evaluation's largest array (grid points x terms x runs, float64):
# the runs are taken a block at a time, so memory stays bounded whatever the table's size.
GRID_BLOCK_BYTES = 2**25


def grid_objective(grid: np.ndarray, xs: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    """The objective (summed Huber loss) at every point of ``grid`` (points, parameters): (points,).
    Evaluated over blocks of runs of at most :data:`GRID_BLOCK_BYTES` each."""
    per_run = grid.shape[0] * (1 + xs.shape[0]) * 8
    block = max(1, GRID_BLOCK_BYTES // per_run)
    total = np.zeros(grid.shape[0])
    for start in range(0, xs.shape[1], block):
        runs = slice(start, start + block)
        values, _ = _huber(np.logaddexp.reduce(_log_terms(grid, xs[:, runs]), axis=-2) - log_l[runs], HUBER_DELTA)
        total += values.sum(-1)
    return total


def _fit_law(grid: np.ndarray, xs: np.ndarray, log_l: np.ndarray, keep: int | None, bounds: list) -> np.ndarray:
    """L-BFGS from every point of ``grid`` (points, parameters), or from the ``keep`` with the
    lowest objective; the best fit's parameters."""
    if keep is None:
        return _lbfgs(_objective, list(grid), (xs, log_l), bounds)
    return _lbfgs(_objective, _best_starts(grid, grid_objective(grid, xs, log_l), keep), (xs, log_l), bounds)


def _best_starts(grid: np.ndarray, values: np.ndarray, keep: int) -> list[np.ndarray]:
    """The ``keep`` points of ``grid`` with the lowest objective ``values``."""
    return [grid[i] for i in np.argsort(values)[:keep]]


def _at_bound(theta: np.ndarray, bounds: list) -> bool:
    """Whether a fitted parameter sits on its box: the data do not pin that direction down."""
    return any(math.isclose(x, b, abs_tol=1e-6) for x, pair in zip(theta, bounds, strict=True) for b in pair)


def _lbfgs(objective, starts: list[np.ndarray], args: tuple, bounds: list) -> np.ndarray:
    from scipy.optimize import minimize

    best = None
    for x0 in starts:
        # The Huber objective is tiny near a good fit (residuals ~ delta = 1e-3): scipy's default
        # gradient tolerance (1e-5) would stop far from the optimum.
        result = minimize(objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})  # fmt: skip
        if result.success and np.all(np.isfinite(result.x)) and (best is None or result.fun < best.fun):
            best = result
    if best is None:
        raise ScalingFitError("the fit did not converge from any initialisation")
    return best.x


PARAMETRIC_GRID = np.array(list(itertools.product(*GRID.values())), dtype=float)


def fit_parametric(runs: Runs, keep: int | None = None) -> dict[str, float]:
    """L(N, D) = E + A/N^alpha + B/D^beta. L-BFGS runs from every point of the initialisation
    grid (4500 points), or, with ``keep``, from the ``keep`` points with the lowest objective (the
    bootstrap's shortcut), and the fit with the lowest objective is kept."""
    points = len(set(zip(runs.params.tolist(), runs.tokens.tolist(), strict=True)))
    if points < MIN_POINTS or len(set(runs.params.tolist())) < 2 or len(set(runs.tokens.tolist())) < 2:
        raise ScalingFitError(
            f"the parametric fit L(N, D) is undetermined: its 5 parameters need runs at {MIN_POINTS} or more "
            f"distinct (N, D), with more than one N and one D (these runs have {points})"
        )
    xs, log_l = np.log(np.stack([runs.params, runs.tokens])), np.log(runs.loss)
    bounds = [LOG_BOUND] * 3 + [EXPONENT_BOUND] * 2
    try:
        theta = _fit_law(PARAMETRIC_GRID, xs, log_l, keep, bounds)
    except ScalingFitError:
        raise ScalingFitError("the parametric fit L(N, D) did not converge from any initialisation") from None
    e, a, b, alpha, beta = theta
    fit = {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta),
           "objective": float(_objective(theta, xs, log_l)[0]), "theta": theta.tolist(),
           "at_bound": _at_bound(theta, bounds)}  # fmt: skip
    if alpha > 0 and beta > 0:
        fit["a"] = float(beta / (alpha + beta))  # N_opt ~ C^a
        fit["b"] = float(alpha / (alpha + beta))  # D_opt ~ C^b
        fit["G"] = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    return fit


def compute_optimal(fit: dict[str, float], flops: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """N_opt and D_opt for a compute budget C under a parametric fit (C = 6 N D)."""
    c = np.asarray(flops, dtype=float) / 6
    return fit["G"] * c ** fit["a"], c ** fit["b"] / fit["G"]


# ----- the frontier L(C) ---------------------------------------------------------------------------
def frontier(runs: Runs) -> np.ndarray:
    """Indices of the runs that no run of less or equal compute beats, in order of compute."""
    order = np.lexsort((runs.loss, runs.flops))
    keep, best = [], math.inf
    for i in order:
        if runs.loss[i] < best:
            keep.append(i)
            best = runs.loss[i]
    return np.array(keep, dtype=int)


FRONTIER_GRID = np.array(list(itertools.product(GRID["e"], GRID["a"], (0.05, 0.1, 0.2, 0.5, 1.0))), dtype=float)


def fit_frontier(runs: Runs, keep: int | None = None) -> dict[str, float]:
    """L(C) = E + A C^-alpha through the frontier, fitted like the parametric law (from every
    point of its 75-point grid, or the ``keep`` best)."""
    idx = frontier(runs)
    if len(idx) < 3:
        raise ScalingFitError(f"the loss-compute frontier has {len(idx)} runs; a power law needs at least 3")
    bounds = [LOG_BOUND, LOG_BOUND, EXPONENT_BOUND]
    try:
        theta = _fit_law(FRONTIER_GRID, np.log(runs.flops[idx])[None], np.log(runs.loss[idx]), keep, bounds)
    except ScalingFitError:
        raise ScalingFitError("the frontier fit L(C) did not converge from any initialisation") from None
    e, a, alpha = theta
    return {"E": math.exp(e), "A": math.exp(a), "alpha": float(alpha), "runs": idx.tolist(),
            "at_bound": _at_bound(theta, bounds)}  # fmt: skip


# ----- IsoFLOP profiles ----------------------------------------------------------------------------
def isoflop_groups(runs: Runs, tolerance: float = 0.05) -> list[np.ndarray]:
    """Runs grouped by compute budget: budgets within ``tolerance`` (relative) of each other."""
    order = np.argsort(runs.flops)
    groups: list[list[int]] = []
    for i in order:
        if groups and runs.flops[i] <= runs.flops[groups[-1][0]] * (1 + tolerance):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g) for g in groups]


def fit_isoflop(runs: Runs) -> dict:
    """A parabola in log N through each budget's runs (3 or more sizes); N*(C); D*(C) from the
    runs' tokens, a line of log D in log N through the group evaluated at N* (the runs' FLOPs may
    be exact counts, not 6ND, so C/(6N*) would not be their tokens); then N* = k C^a and
    D* = k' C^b by least squares in log space (needs 2 or more budgets)."""
    profiles, unbracketed = [], []
    for group in isoflop_groups(runs):
        if len(np.unique(runs.params[group])) < 3:
            continue
        x, y = np.log(runs.params[group]), runs.loss[group]
        c2, c1, c0 = np.polyfit(x, y, 2)
        log_n = -c1 / (2 * c2) if c2 > 0 else math.nan
        if not x.min() <= log_n <= x.max():
            # no minimum, or one outside the sizes trained: the sizes do not bracket the optimum
            unbracketed.append(float(np.exp(np.log(runs.flops[group]).mean())))
            continue
        flops = float(np.exp(np.log(runs.flops[group]).mean()))
        n_opt = math.exp(log_n)
        slope, intercept = np.polyfit(x, np.log(runs.tokens[group]), 1)
        profiles.append({"flops": flops, "n_opt": n_opt, "d_opt": math.exp(intercept + slope * log_n),
                         "loss_opt": c0 + c1 * log_n + c2 * log_n**2, "parabola": [c2, c1, c0],
                         "runs": group.tolist()})  # fmt: skip
    if len(profiles) < 2:
        raise ScalingFitError(
            f"{len(profiles)} compute budget(s) have 3 or more sizes bracketing a minimum; IsoFLOP needs 2"
            + (f" (not bracketed: {', '.join(f'{c:.3g}' for c in unbracketed)} FLOPs)" if unbracketed else "")
        )
    log_c = np.log([p["flops"] for p in profiles])
    a, log_k = np.polyfit(log_c, np.log([p["n_opt"] for p in profiles]), 1)
    b, log_k2 = np.polyfit(log_c, np.log([p["d_opt"] for p in profiles]), 1)
    return {"profiles": profiles, "a": a, "k": math.exp(log_k), "b": b, "k_d": math.exp(log_k2),
            "unbracketed_budgets": unbracketed}  # fmt: skip


def best_per_budget(runs: Runs) -> list[dict[str, float]]:
    """For each compute budget (:func:`isoflop_groups`), the run with the lowest loss."""
    out = []
    for group in isoflop_groups(runs):
        best = group[np.argmin(runs.loss[group])]
        out.append({"flops": float(np.exp(np.log(runs.flops[group]).mean())), "runs": len(group),
                     "loss": float(runs.loss[best]), "params": float(runs.params[best]),
                     "tokens": float(runs.tokens[best])})  # fmt: skip
    return out


# ----- everything, with intervals -----------------------------------------------------------------
_PARAMETRIC_KEYS = ("E", "A", "B", "alpha", "beta", "a", "b")


def fit_family(runs: Runs, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95,
               starts: int = BOOTSTRAP_STARTS, fit_starts: int | None = None) -> dict:  # fmt: skip
    """All three fits of one family's runs, each parameter with a bootstrap interval. L-BFGS starts
    from every grid point for the fits themselves (or the ``fit_starts`` best) and from the
    ``starts`` best on each resample."""
    if len(runs) < MIN_POINTS:
        raise ScalingFitError(f"{len(runs)} runs; a scaling fit needs at least {MIN_POINTS}")
    out: dict = {"runs": len(runs), "budgets": best_per_budget(runs)}
    fits = {"parametric": _try(lambda r: fit_parametric(r, keep=fit_starts), runs),
            "frontier": _try(lambda r: fit_frontier(r, keep=fit_starts), runs), "isoflop": _try(fit_isoflop, runs)}  # fmt: skip
    if all("error" in f for f in fits.values()):
        raise ScalingFitError("no fit succeeded: " + "; ".join(f"{k}: {v['error']}" for k, v in fits.items()))
    rng = np.random.default_rng(seed)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in fits}
    failures = dict.fromkeys(fits, 0)
    for _ in range(bootstrap):
        sample = runs.take(rng.integers(0, len(runs), len(runs)))
        for name, fn in (("parametric", lambda r: fit_parametric(r, keep=starts)),
                         ("frontier", lambda r: fit_frontier(r, keep=starts)), ("isoflop", fit_isoflop)):  # fmt: skip
            if "error" in fits[name]:
                continue
            try:
                result = fn(sample)
            except ScalingFitError:
                failures[name] += 1
                continue
            for key, value in result.items():
                if isinstance(value, float):
                    samples[name].setdefault(key, []).append(value)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    for name, result in fits.items():
        if "error" not in result and bootstrap:
            result["intervals"] = {
                key: [float(np.percentile(values, lo)), float(np.percentile(values, hi))]
                for key, values in samples[name].items()
            }
            result["bootstrap"] = {"resamples": bootstrap, "failed": failures[name], "level": level}
        out[name] = result
    return out


def _try(fn, runs: Runs) -> dict:
    try:
        return fn(runs)
    except ScalingFitError as e:
        return {"error": str(e)}


def fit_table(
    runs: Runs, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, fit_starts: int | None = None
) -> dict[str, dict]:
    """:func:`fit_family` for each family of the table; a family that cannot be fitted is kept as
    ``{"skipped": why}`` while the others are fitted (:class:`ScalingFitError` if none can be)."""
    fits: dict[str, dict] = {}
    for name in sorted(set(runs.family)):
        try:
            family = runs.take(np.flatnonzero(runs.family == name))
            fits[str(name)] = fit_family(family, bootstrap, seed, fit_starts=fit_starts)
        except ScalingFitError as e:
            fits[str(name)] = {"skipped": str(e)}
    if all("skipped" in f for f in fits.values()):
        raise ScalingFitError(
            "no family could be fitted: " + "; ".join(f"{k}: {v['skipped']}" for k, v in fits.items())
        )
    return fits


def finite_json(value):
    """``value`` with every non-finite float replaced by None: JSON has no Infinity or NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def plot(runs: Runs, fits: dict[str, dict], path: str | Path) -> None:
    """Loss vs FLOPs per family with the frontier fits; IsoFLOP profiles; N*(C)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, fit) in enumerate((n, f) for n, f in fits.items() if "skipped" not in f):
        color = colors[k % len(colors)]
        mine = runs.take(np.flatnonzero(runs.family == name))
        axes[0].scatter(mine.flops, mine.loss, s=12, color=color, alpha=0.6)
        c = np.geomspace(mine.flops.min(), mine.flops.max() * 4, 100)
        if "error" not in fit["frontier"]:
            f = fit["frontier"]
            axes[0].plot(c, f["E"] + f["A"] * c ** -f["alpha"], color=color,
                         label=f"{name}: L = {f['E']:.2f} + {f['A']:.3g} C^-{f['alpha']:.3f}")  # fmt: skip
        for group in isoflop_groups(mine):  # every budget's runs, bracketed or not
            order = group[np.argsort(mine.params[group])]
            axes[1].plot(mine.params[order], mine.loss[order], "o-", ms=3, lw=0.8, color=color, alpha=0.6)
        if "error" not in fit["isoflop"]:
            for p in fit["isoflop"]["profiles"]:
                group = mine.take(np.array(p["runs"]))
                n = np.geomspace(group.params.min(), group.params.max(), 50)
                axes[1].plot(n, np.polyval(p["parabola"], np.log(n)), color=color, lw=1)
            iso = fit["isoflop"]
            budgets = [p["flops"] for p in iso["profiles"]]
            axes[2].scatter(budgets, [p["n_opt"] for p in iso["profiles"]], color=color, s=16)
            axes[2].plot(
                c, iso["k"] * c ** iso["a"], color=color, ls="--", label=f"{name} IsoFLOP: N* ~ C^{iso['a']:.2f}"
            )
        if "error" not in fit["parametric"] and "a" in fit["parametric"] and not fit["parametric"]["at_bound"]:
            axes[2].plot(c, compute_optimal(fit["parametric"], c)[0], color=color,
                         label=f"{name} L(N, D): N_opt ~ C^{fit['parametric']['a']:.2f}")  # fmt: skip
    for ax, (xl, yl, title) in zip(axes, [("training FLOPs", "loss", "loss vs compute"),
                                          ("parameters", "loss", "IsoFLOP profiles"),
                                          ("training FLOPs", "parameters", "compute-optimal size")], strict=True):  # fmt: skip
        ax.set_xscale("log")
        if ax is axes[2]:
            ax.set_yscale("log")
        ax.set(xlabel=xl, ylabel=yl, title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def _sig(x: float, digits: int = INTERVAL_DIGITS) -> str:
    """``x`` to ``digits`` significant digits, without an exponent for everyday magnitudes."""
    return f"{float(f'{x:.{digits}g}'):g}"


def summary(fits: dict[str, dict]) -> str:
    """The fitted parameters with their intervals, a few lines per family."""

    def show(result: dict, keys: tuple[str, ...]) -> str:
        intervals = result.get("intervals", {})
        parts = []
        for key in keys:
            if key in result:
                span = intervals.get(key)
                parts.append(f"{key} {result[key]:.4g}" + (f" [{_sig(span[0])}, {_sig(span[1])}]" if span else ""))
        return ", ".join(parts)

    lines = []
    for name, fit in fits.items():
        if "skipped" in fit:
            lines.append(f"{name}: skipped ({fit['skipped']})")
            continue
        level = fit["parametric"].get("bootstrap", {}).get("level", 0.95)
        lines.append(f"{name} ({fit['runs']} runs; intervals: {level:.0%} bootstrap)")
        for b in fit["budgets"]:
            lines.append(f"  best at {b['flops']:.3g} FLOPs: loss {b['loss']:.4f} ({b['params']:.3g} params, "
                         f"{b['tokens']:.3g} tokens; {b['runs']} runs)")  # fmt: skip
        for kind, keys in (
            ("parametric", _PARAMETRIC_KEYS),
            ("frontier", ("E", "A", "alpha")),
            ("isoflop", ("a", "b")),
        ):
            result = fit[kind]
            text = result["error"] if "error" in result else show(result, keys)
            if result.get("at_bound"):
                text += " (a parameter sits on its bound: not determined by these runs)"
            lines.append(f"  {kind}: {text}")
    return "\n".join(lines)
