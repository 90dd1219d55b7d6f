"""A verifiable task generated offline: two-digit addition, with an exact reward.

Prompts are ``"a+b="``; the answer is ``a + b`` followed by a newline (the stop). The reward of a
completion is ``1 - min(|answer - (a + b)|, 10) / 10``: 1 for the right sum, less the further off,
0 for ten or more away or an answer that is not a number. Used by ``experiments/align_arithmetic.py``
(docs/finetuning.md) to compare DPO and QRPO from the same reference samples.
"""

from __future__ import annotations

import re

import numpy as np

_PROMPT = re.compile(r"(\d+)\+(\d+)=$")


def make_prompts(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` pairs of two-digit numbers, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    return [(int(a), int(b)) for a, b in rng.integers(10, 100, (n, 2))]


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def sft_example(a: int, b: int) -> dict:
    return {"prompt": prompt(a, b), "completion": f"{a + b}\n"}


def reward(text: str, completion: str) -> float:
    """The reward of ``completion`` for the prompt ``text`` (``"a+b="``)."""
    match = _PROMPT.search(text)
    if match is None:
        raise ValueError(f"not an addition prompt: {text!r}")
    truth = int(match.group(1)) + int(match.group(2))
    answer = completion.strip()
    if not answer.isdigit():
        return 0.0
    return 1.0 - min(abs(int(answer) - truth), 10) / 10
