"""Run logs: a console progress line, JSONL and CSV always, TensorBoard when installed, a loss PNG."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from griffon.atomic import atomic_savefig, atomic_write, describe_os_error
from griffon.run import Run

CSV_FIELDS = ("kind", "step", "tokens", "loss", "val_loss", "val_bpb", "lr", "tokens_per_s")


class LogWriteError(RuntimeError):
    """The run's log cannot be written (a full disk, say). Checkpoints already written stay valid."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``. A last line cut short (a crash or a full disk during a
    write) is dropped; any other malformed line is an error naming the file and line."""
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if lineno == len(lines):
                break
            raise ValueError(f"{path}:{lineno}: malformed log record ({e})") from None
        records.append(record)
    return records


class RunLogger:
    """Append-only metrics log of a run (rank 0 only)."""

    def __init__(self, run: Run, enabled: bool = True, truncate_after_step: int | None = None) -> None:
        self.run, self.enabled = run, enabled
        self.jsonl = run.log
        self.csv = run.log_csv
        self.start = time.time()
        self._tb = None
        if not enabled:
            return
        if truncate_after_step is not None:
            # A resumed run repeats the steps after its checkpoint: drop their old records.
            self._truncate(truncate_after_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run.tensorboard))
        except ImportError:
            self._tb = None

    def _truncate(self, step: int) -> None:
        if not self.jsonl.is_file():
            return
        records = [r for r in read_records(self.jsonl) if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(self.jsonl, lambda tmp: tmp.write_text(text))
        self.csv.unlink(missing_ok=True)
        for r in records:
            self._write_csv(r)

    def _write_csv(self, record: dict[str, Any]) -> None:
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(CSV_FIELDS)
            w.writerow([record.get(k, "") for k in CSV_FIELDS])

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
            self._write_csv(record)
        except OSError as e:
            raise LogWriteError(f"cannot write the log in {self.run.root}: {describe_os_error(e)}") from None
        if not sys.stderr.isatty():  # no progress bar in logs: print the record instead
            # lists (each MoE layer's load) go to the JSONL only
            shown = {
                k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items() if not isinstance(v, list)
            }
            sys.stderr.write(" ".join(f"{k}={v}" for k, v in shown.items()) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def progress(self, step: int, fraction: float, tokens_per_s: float, loss: float) -> None:
        """One overwritten console line: step, loss, tokens/s and ETA (terminals only)."""
        if not self.enabled or not sys.stderr.isatty():
            return
        elapsed = time.time() - self.start
        eta = elapsed / fraction - elapsed if fraction > 0 else float("nan")
        bar = "#" * int(20 * fraction)
        sys.stderr.write(
            f"\r[{bar:<20}] {100 * fraction:5.1f}% step {step} loss {loss:.4f} "
            f"{tokens_per_s:,.0f} tok/s ETA {_fmt(eta)}   "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and sys.stderr.isatty():
            sys.stderr.write("\n")
        if self._tb is not None:
            self._tb.close()


def _fmt(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def plot_losses(run: Run) -> Path | None:
    """Training and validation loss against tokens, as ``loss.png``; None without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not run.log.is_file():
        return None
    records = read_records(run.log)
    train = [(r["tokens"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["tokens"], r["val_loss"]) for r in records if r["kind"] in ("eval", "final_eval")]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", ms=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run.root.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run.plot
    fig.tight_layout()
    atomic_savefig(fig, out)
    plt.close(fig)
    return out


def plot_moe_load(run: Run) -> Path | None:
    """Each mixture-of-experts layer's load (the share of assignments each expert got) against
    steps, as ``moe_load.png``; None for a run without experts."""
    records = (
        [r for r in read_records(run.log) if r["kind"] == "train" and "moe_load" in r] if run.log.is_file() else []
    )
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    layers = len(records[0]["moe_load"])
    cols = min(layers, 4)
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for layer, ax in enumerate(axes.flat):
        if layer >= layers:
            ax.axis("off")
            continue
        shares = [r["moe_load"][layer] for r in records]  # (steps, experts)
        for expert in range(len(shares[0])):
            ax.plot(steps, [s[expert] for s in shares], lw=1)
        ax.axhline(1 / len(shares[0]), color="grey", ls=":", lw=1)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0][0].set_ylabel("share of assignments")
    fig.suptitle(f"{run.root.name}: expert load (dotted: uniform)", fontsize=10)
    fig.tight_layout()
    out = run.moe_plot
    atomic_savefig(fig, out)
    plt.close(fig)
    return out
