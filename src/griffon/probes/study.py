"""Train models on a probe task and measure exact-match accuracy against length: ``griffon probe``.

Training goes through griffon's own trainer as supervised fine-tuning on byte tokens
(``objective=sft``: the loss on the answer's bytes only), on examples of the task's training
length drawn from a seed. Evaluation reads each prompt whole (the recurrences' state carried
through it, as in decoding) and decodes the answer greedily; an answer counts when every byte is
right. Checkpoints along the way give the learning curve: accuracy at the training length
against steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from griffon.accounting import decode_state_bytes
from griffon.align.sft import SFTData, pack
from griffon.data.tokenizers import ByteTokenizer, Tokenizer
from griffon.probes.tasks import CPU_SCALE, Task, symbols

FAMILIES = {"griffin": "griffin-tiny", "hawk": "hawk-tiny", "mqa": "mqa-tiny"}
"""The model of each family a probe trains (``--set model.*`` changes it)."""


def examples(task: Task, n: int, length: int, seed: int) -> list[tuple[list[int], list[bool]]]:
    """``n`` examples of ``length`` as byte ids, the answer's bytes marked as the loss's targets."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ex = task.example(rng, length)
        prompt, answer = list(ex.prompt.encode()), list(ex.answer.encode())
        out.append((prompt + answer, [False] * len(prompt) + [True] * len(answer)))
    return out


def probe_examples(task: Task, length: int, n_train: int, n_val: int, seed: int) -> tuple[list, list]:
    """The training and validation examples of ``length`` drawn from ``seed``."""
    return examples(task, n_train, length, seed), examples(task, n_val, length, seed + 1_000_003)


def example_seq_len(*sets: list) -> int:
    """The training sequence length that holds the longest of these examples."""
    return max(len(ids) for s in sets for ids, _ in s) - 1


def probe_data(train: list, val: list, seq_len: int) -> SFTData:
    """Examples packed into rows of ``seq_len`` for the trainer."""
    return SFTData(ByteTokenizer(), pack(train, seq_len), pack(val, seq_len))


@dataclass
class Accuracy:
    length: int
    correct: int = 0
    """Answers right in every symbol."""
    total: int = 0
    symbols_right: int = 0
    """Answer symbols right, in place: a partial credit that shows learning before exact answers do."""
    symbols_total: int = 0

    @property
    def value(self) -> float:
        return self.correct / self.total

    @property
    def per_symbol(self) -> float:
        return self.symbols_right / self.symbols_total

    def add(self, answer: str, completion: str) -> None:
        """Score one completion against its answer, symbol by symbol (whitespace dropped)."""
        want, got = symbols(answer), symbols(completion)[: len(symbols(answer))]
        self.correct += got == want
        self.total += 1
        self.symbols_right += sum(a == b for a, b in zip(got, want, strict=False))
        self.symbols_total += len(want)


def accuracy(model, tokenizer: Tokenizer, task: Task, length: int, n: int, seed: int, batch: int = 32) -> Accuracy:
    """Exact-match accuracy of greedy answers on ``n`` fresh examples of ``length``, rendered for
    ``tokenizer`` (side by side for bytes, spaced for any other: :mod:`griffon.probes.tasks`)."""
    from griffon.decode.generate import generate_text

    spaced = tokenizer.kind != "bytes"
    rng = np.random.default_rng(seed)
    items = [task.example(rng, length, spaced) for _ in range(n)]
    result = Accuracy(length)
    for start in range(0, n, batch):
        group = items[start : start + batch]
        # A byte model answers in exactly the answer's bytes; a subword one gets a little slack.
        width = max(len(tokenizer.encode(ex.answer)) + (2 if spaced else 0) for ex in group)
        outs = generate_text(model, tokenizer, [ex.prompt for ex in group], width, temperature=0.0, step="model")
        for ex, out in zip(group, outs, strict=True):
            result.add(ex.answer, out)
    return result


def longest_prompt(task: Task, lengths: list[int]) -> int:
    """Bytes of a prompt of the longest of ``lengths`` (one drawn: phonebook names vary in length)."""
    return max(len(task.example(np.random.default_rng(0), n).prompt.encode()) for n in lengths)


def check_model_fits(task: Task, cfg, lengths: list[int]) -> None:
    """A model that cannot represent the task is refused before anything is trained: its vocabulary
    must hold the bytes, a global-attention model's ``max_seq_len`` the longest prompt."""
    if cfg.vocab_size < 256:
        raise ValueError(f"probes are byte tokens: model.vocab_size must be at least 256, got {cfg.vocab_size}")
    longest = longest_prompt(task, lengths) + 16
    if cfg.max_seq_len is not None and cfg.max_seq_len < longest:
        raise ValueError(
            f"{task.name}: the longest evaluation ({longest} bytes) is beyond model.max_seq_len={cfg.max_seq_len}; "
            "raise it or drop the longest --lengths"
        )


# Host bytes per token of a drawn example: its symbols, ids and loss mask as Python lists, and
# the packed rows, rounded up.
HOST_BYTES_PER_TOKEN = 64
# Training activations per token, layer and unit of width, in float32 words (forward and backward
# of a block hold a few dozen tensors of the residual's width), rounded up.
ACTIVATION_WORDS = 32
EVAL_BATCH = 32  # examples decoded together by :func:`accuracy`
PREFILL_CHUNK = 1024  # prompt tokens per prefill call of :func:`~griffon.decode.generate.generate_text`
MEMORY_SHARE = 0.5  # of the memory free at the start, what a probe may plan to take


def probe_memory(task: Task, cfg, train_length: int | None, lengths: list[int], n_train: int, n_eval: int,
                 batch: int = 16, spaced: bool = False) -> int:  # fmt: skip
    """Bytes a probe needs, estimated before anything is drawn: the training and validation
    examples and a training batch's activations at ``train_length`` (``None``: no training), and
    the evaluation's examples, decode state and, with global attention, one prefill chunk's scores
    at the longest of ``lengths``."""
    longest = max(task.prompt_bytes(n, spaced) for n in lengths)
    need = n_eval * longest * HOST_BYTES_PER_TOKEN + EVAL_BATCH * decode_state_bytes(cfg, longest, torch.float32)
    if cfg.has_global_attention:
        need += EVAL_BATCH * cfg.num_heads * min(longest, PREFILL_CHUNK) * longest * 4
    if train_length is not None:
        seq = task.prompt_bytes(train_length, spaced)
        need += (n_train + max(n_train // 10, 16)) * seq * HOST_BYTES_PER_TOKEN
        need += batch * seq * cfg.width * cfg.num_layers * ACTIVATION_WORDS * 4
        if cfg.has_global_attention:
            need += 2 * batch * cfg.num_heads * seq * seq * 4
    return need


def check_memory(need: int, free: int, what: str) -> None:
    """Refuse a probe whose :func:`probe_memory` passes ``MEMORY_SHARE`` of ``free`` bytes."""
    if need > MEMORY_SHARE * free:
        raise ValueError(
            f"{what} needs about {need / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of the "
            f"{free / 2**30:.1f} GiB free here: lower the lengths or the examples"
        )


def write_results(path: Path, results: dict) -> None:
    from griffon.atomic import atomic_write

    text = json.dumps(results, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


REACHED = 0.9
"""Exact-match accuracy at the training length from which a run counts as having learned the task:
only such runs' accuracy at other lengths is read (an untrained model at chance is not a finding)."""


def interval(values: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` (one per seed) and Student's t interval for it; a single value has none."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": len(x)}
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(x)}


def summarize(runs: list[dict]) -> dict:
    """Across one family's seeds: how many reached the task, exact accuracy against length over
    those that did, and the per-symbol learning curve (every seed: slow learning is the finding)."""
    reached = [r for r in runs if r["reached"]]
    lengths = list(runs[0]["accuracy"])
    return {
        "reached": len(reached), "seeds": len(runs),
        "accuracy": {n: interval([r["accuracy"][n] for r in reached]) for n in lengths} if reached else {},
        "curve": [[s, interval([_at(r, s) for r in runs])] for s in _common_steps(runs)],
    }  # fmt: skip


def _common_steps(runs: list[dict]) -> list[int]:
    """The checkpoint steps every run has (a resumed run has one more, where it was cut)."""
    return sorted(set.intersection(*(set(c[0] for c in r["curve"]) for r in runs))) if runs else []


def _at(run: dict, step: int) -> float:
    """A run's per-symbol accuracy at the training length at ``step``."""
    return next(c[2] for c in run["curve"] if c[0] == step)


def differences(models: dict[str, dict], baseline: str) -> dict[str, list]:
    """Each family's per-symbol learning curve minus ``baseline``'s, seed by seed (the same seed
    draws the same examples for every family, so the differences are paired), with intervals."""
    out = {}
    base = {r["seed"]: r for r in models[baseline]["runs"]}
    for family, m in models.items():
        if family == baseline:
            continue
        pairs = [(r, base[r["seed"]]) for r in m["runs"] if r["seed"] in base]
        steps = _common_steps([run for pair in pairs for run in pair])
        out[f"{family}-{baseline}"] = [[s, interval([_at(r, s) - _at(b, s) for r, b in pairs])] for s in steps]
    return out


def plot_results(results: dict, path: Path) -> None:
    """Exact-match accuracy against length over the runs that reached the task (left), and
    per-symbol accuracy at the training length against steps over every seed (right), one line
    per model, with 95% intervals where there are several seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_length, by_step) = plt.subplots(1, 2, figsize=(10, 4))
    for family, m in results["models"].items():
        s = m["summary"]
        if s["accuracy"]:
            lengths = sorted(s["accuracy"], key=int)
            pts = [s["accuracy"][n] for n in lengths]
            by_length.errorbar(
                [int(n) for n in lengths], [p["mean"] for p in pts], capsize=3, marker="o",
                yerr=_bars(pts), label=f"{family} ({s['reached']}/{s['seeds']} seeds reached the task)",
            )  # fmt: skip
        steps = [c[0] for c in s["curve"]]
        mean = np.array([c[1]["mean"] for c in s["curve"]])
        (line,) = by_step.plot(steps, mean, "o-", label=family)
        if s["seeds"] > 1:
            lo, hi = (np.array([c[1][k] for c in s["curve"]]) for k in ("lo", "hi"))
            by_step.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    by_length.axvline(results["train_length"], color="grey", ls=":", label="training length")
    by_length.set(xscale="log", xlabel="length", ylabel="exact match", ylim=(-0.05, 1.05), title=results["task"])
    by_step.set(xlabel="step", ylabel="per-symbol accuracy at the training length", ylim=(-0.05, 1.05))
    by_length.legend(fontsize=7)
    by_step.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(points: list[dict]) -> np.ndarray | None:
    if any(np.isnan(p["lo"]) for p in points):
        return None
    return np.array([[p["mean"] - p["lo"] for p in points], [p["hi"] - p["mean"] for p in points]])


def train_study(
    task: Task,
    models: list[str],
    out: Path,
    train_length: int | None = None,
    window: int | None = None,
    lengths: list[int] | None = None,
    steps: int = 300,
    batch: int = 16,
    lr: float = 3e-3,
    examples: int = 4000,
    eval_examples: int = 100,
    seeds: tuple[int, ...] = (0,),
    overrides: tuple[str, ...] = (),
) -> dict:
    """Train each of ``models`` (:data:`FAMILIES`) on ``task`` once per seed through griffon's
    trainer (SFT on the answer's bytes) and measure exact-match and per-symbol accuracy against
    length and along training; write ``out/results.json`` and ``out/accuracy.png`` and return the
    results. Defaults: the paper's training length and Griffin window divided by :data:`CPU_SCALE`,
    evaluated at 1-16x the training length. A study cut short resumes; more seeds may join a finished
    one under its own settings. Everything is checked (lengths, memory, the models) before anything
    is drawn or trained."""
    from griffon.checkpoint import load_for_inference
    from griffon.machine import free_memory
    from griffon.run import Run, checkpoint_step
    from griffon.train.config import TrainConfig, apply_overrides
    from griffon.train.trainer import train

    unknown = [m for m in models if m not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown model family {unknown[0]!r}; families: {', '.join(FAMILIES)}")
    unknown = [m for m in models if m not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown model family {unknown[0]!r}; families: {', '.join(FAMILIES)}")
    length = train_length if train_length is not None else max(task.train_length // CPU_SCALE, task.min_length)
    window = window if window is not None else max(task.window // CPU_SCALE, 1)
    if window < 1:
        raise ValueError(f"--window must be at least 1, got {window}")
    lengths = lengths or [length * k for k in (1, 2, 4, 8, 16)]
    for n in [length, *lengths]:
        task.check_length(n)

    def config(family: str, seed: int, seq_len: int) -> TrainConfig:
        d = apply_overrides(TrainConfig().to_dict(), [
            f"model={FAMILIES[family]}", "objective=sft", f"data.seq_len={seq_len}", f"data.batch_size={batch}",
            f"max_steps={steps}", "max_minutes=null", "dtype=fp32", f"save_every={max(steps // 5, 1)}",
            "keep_checkpoints=10", f"eval_every={steps}", "log_every=10", f"optim.lr={lr}",
        ] + ([f"model.attention_window={window}"] if family == "griffin" else [])
          + ([f"model.max_seq_len={longest_prompt(task, lengths) * 5 // 4 + 64}"] if family == "mqa" else [])
          + list(overrides))  # fmt: skip
        return dataclasses.replace(TrainConfig.from_dict(d), seed=seed)

    # Before anything is drawn: what the lengths and examples would take, by each family's model.
    free = free_memory(torch.device("cpu"))
    for family in models:
        planned = config(family, seeds[0], task.prompt_bytes(length)).model
        need = probe_memory(task, planned, length, lengths, examples, eval_examples, batch)
        check_memory(need, free, f"{task.name} at training length {length} and lengths up to {max(lengths)}")
    results: dict = {
        "task": task.name, "params": dataclasses.asdict(task), "train_length": length,
        "window": window if "griffin" in models else None,
        "lengths": lengths, "steps": steps, "examples": examples, "seeds": seeds,
        "reached_at": REACHED, "models": {f: {"runs": []} for f in models},
    }  # fmt: skip
    if (out / "results.json").exists():
        # More seeds may join a finished study (its runs are read again), but only under its settings.
        held = json.loads((out / "results.json").read_text())
        changed = [k for k in ("task", "params", "train_length", "window", "lengths", "steps", "examples")
                   if held.get(k) != json.loads(json.dumps(results[k]))]  # fmt: skip
        if changed:
            raise ValueError(
                f"{out} holds a probe study with other settings ({', '.join(changed)}); pick another --out"
            )
    drawn = {seed: probe_examples(task, length, examples, max(examples // 10, 16), seed) for seed in seeds}
    configs = {}
    for family, seed in itertools.product(models, seeds):
        # Per seed, so that a run's config does not depend on which other seeds share the command.
        cfg = config(family, seed, example_seq_len(*drawn[seed]))
        check_model_fits(task, cfg.model, lengths)
        configs[family, seed] = cfg
    for family in models:  # each model's own window (None: global attention or none)
        model_cfg = configs[family, seeds[0]].model
        has_local = any(t == "attention" for t in model_cfg.block_types) and not model_cfg.has_global_attention
        results["models"][family]["attention_window"] = model_cfg.attention_window if has_local else None
    tokenizer = ByteTokenizer()
    for seed in seeds:
        data = probe_data(*drawn[seed], example_seq_len(*drawn[seed]))
        for family in models:
            run_dir = out / f"{family}-s{seed}"
            t0 = time.perf_counter()
            # A study cut short resumes: finished runs are read again, killed ones go on.
            train(configs[family, seed], run_dir, resume=Run(run_dir).exists(), data=data)
            curve = []  # [step, exact, per symbol] at the training length
            for ckpt in Run(run_dir).checkpoints():
                model = load_for_inference(ckpt, device="cpu")[0]
                a = accuracy(model, tokenizer, task, length, eval_examples, seed + 7)
                curve.append([checkpoint_step(ckpt), a.value, a.per_symbol])
            model = load_for_inference(run_dir, device="cpu")[0]
            scores = {n: accuracy(model, tokenizer, task, n, eval_examples, seed + 11) for n in lengths}
            run = {
                "seed": seed, "curve": curve, "accuracy": {n: a.value for n, a in scores.items()},
                "per_symbol": {n: a.per_symbol for n, a in scores.items()},
                "reached": scores[length].value >= REACHED if length in scores else curve[-1][1] >= REACHED,
                "seconds": time.perf_counter() - t0,
            }  # fmt: skip
            results["models"][family]["runs"].append(run)
            print(f"{family} seed {seed}: {'reached' if run['reached'] else 'did not reach'} the task; exact by "
                  f"length {run['accuracy']}; per symbol {run['per_symbol']}; curve {curve}", flush=True)  # fmt: skip
    for m in results["models"].values():
        m["summary"] = summarize(m["runs"])
    if "mqa" in results["models"]:
        results["differences"] = differences(results["models"], "mqa")
    write_results(out / "results.json", results)
    plot_results(results, out / "accuracy.png")
    return results
