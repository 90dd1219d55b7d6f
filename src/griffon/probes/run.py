"""Train models on a probe task and measure exact-match accuracy against length: ``griffon probe``.

Training goes through griffon's own trainer as supervised fine-tuning on byte tokens
(``objective=sft``: the loss on the answer's bytes only), on examples of the task's training
length drawn from a seed. Evaluation reads each prompt whole (the recurrences' state carried
through it, as in decoding) and decodes the answer greedily; an answer counts when every byte is
right. Checkpoints along the way give the learning curve: accuracy at the training length
against steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from griffon.align.sft import SFTData, pack
from griffon.data.tokenizers import ByteTokenizer
from griffon.probes.tasks import Task

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


def probe_data(task: Task, length: int, n_train: int, n_val: int, seed: int) -> tuple[SFTData, int]:
    """The training and validation examples of ``length``, packed; and the sequence length that holds one."""
    train = examples(task, n_train, length, seed)
    val = examples(task, n_val, length, seed + 1_000_003)
    seq_len = max(len(ids) for ids, _ in train + val) - 1
    return SFTData(ByteTokenizer(), pack(train, seq_len), pack(val, seq_len)), seq_len


@dataclass
class Accuracy:
    length: int
    correct: int
    """Answers right in every byte."""
    total: int
    bytes_right: int = 0
    """Answer bytes right, in place: a partial credit that shows learning before exact answers do."""
    bytes_total: int = 0

    @property
    def value(self) -> float:
        return self.correct / self.total

    @property
    def per_byte(self) -> float:
        return self.bytes_right / self.bytes_total


def accuracy(model, task: Task, length: int, n: int, seed: int, batch: int = 32) -> Accuracy:
    """Exact-match accuracy of greedy answers on ``n`` fresh examples of ``length``."""
    from griffon.decode.generate import generate

    rng = np.random.default_rng(seed)
    items = [task.example(rng, length) for _ in range(n)]
    result = Accuracy(length, 0, n)
    for start in range(0, n, batch):
        group = items[start : start + batch]
        width = max(len(ex.answer.encode()) for ex in group)
        outs = generate(model, [list(ex.prompt.encode()) for ex in group], width, temperature=0.0, step="model")
        for ex, out in zip(group, outs, strict=True):
            want = ex.answer.encode()
            got = bytes(out[: len(want)])
            result.correct += got == want
            result.bytes_right += sum(a == b for a, b in zip(got, want, strict=False))
            result.bytes_total += len(want)
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


def write_results(path: Path, results: dict) -> None:
    from griffon.atomic import atomic_write

    text = json.dumps(results, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def plot_results(results: dict, path: Path) -> None:
    """Exact-match accuracy against length (left) and per-byte accuracy at the training length
    against steps (right), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_length, by_step) = plt.subplots(1, 2, figsize=(10, 4))
    for family, r in results["models"].items():
        lengths = sorted(r["accuracy"], key=int)
        by_length.plot([int(n) for n in lengths], [r["accuracy"][n] for n in lengths], "o-", label=family)
        by_step.plot([c[0] for c in r["curve"]], [c[-1] for c in r["curve"]], "o-", label=family)
    by_length.axvline(results["train_length"], color="grey", ls=":", label="training length")
    by_length.set(xscale="log", xlabel="length", ylabel="exact match", title=results["task"])
    by_step.set(xlabel="step", ylabel="per-byte accuracy at the training length")
    by_length.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
