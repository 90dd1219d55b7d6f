"""Synthetic probe tasks, rendered as text so that byte-level models train on them and any
checkpoint with a text tokenizer can be probed (``griffon probe``).

Each task draws an example of a given length from a seeded generator: a prompt and the answer
the model must continue it with, and solves a prompt itself (a tiny solver the tests check the
generator against). The registry :data:`TASKS` maps a name to its task; a new task is one class.

* ``selective-copy`` (Griffin paper, Section 6.1, after Gu and Dao's Mamba): ``length`` symbols,
  16 of them data letters (``a``-``p``, the paper's vocabulary of 16) at random positions, the
  rest the noise symbol ``.``; then ``=``; the answer is the data letters in order.
* ``induction`` (Section 6.1): ``length`` random letters ``a``-``p`` in which the trigger ``#`` occurs
  once, followed by a letter; the prompt ends with ``#`` again; the answer is that letter.
* ``phonebook`` (Section 6.2, after Jelassi et al. 2024, "Repeat After Me"): ``length`` entries
  ``name:number`` one a line (names of 2-3 random syllables, 7-digit numbers), then two worked
  lookups ``?name=number`` and a third ``?name=`` whose number is the answer. Its length is the
  phonebook's size, in entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LETTERS = "abcdefghijklmnop"  # 16 data symbols, the paper's vocabulary


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


class Task:
    """A probe task: examples of a length, and their solution from the prompt alone."""

    name: str
    min_length: int
    train_length: int
    """The paper's training length (scaled where the CPU needs it: the probe command says so)."""
    window: int
    """Griffin's local attention window in the paper's experiment."""

    def example(self, rng: np.random.Generator, length: int) -> Example:
        raise NotImplementedError

    def solve(self, prompt: str) -> str:
        raise NotImplementedError

    def check_length(self, length: int) -> None:
        if length < self.min_length:
            raise ValueError(f"{self.name}: length {length} is below the task's minimum {self.min_length}")


class SelectiveCopy(Task):
    name, train_length, window = "selective-copy", 1024, 512
    data_tokens = 16
    min_length = 16

    def example(self, rng: np.random.Generator, length: int) -> Example:
        self.check_length(length)
        seq = np.full(length, ".", dtype="<U1")
        positions = np.sort(rng.choice(length, self.data_tokens, replace=False))
        letters = rng.choice(list(LETTERS), self.data_tokens)
        seq[positions] = letters
        return Example("".join(seq) + "=", "".join(letters))

    def solve(self, prompt: str) -> str:
        return "".join(c for c in prompt[:-1] if c != ".")


class Induction(Task):
    name, train_length, window = "induction", 256, 128
    min_length = 3

    def example(self, rng: np.random.Generator, length: int) -> Example:
        self.check_length(length)
        seq = list(rng.choice(list(LETTERS), length))
        at = int(rng.integers(0, length - 1))
        seq[at] = "#"
        return Example("".join(seq) + "#", seq[at + 1])

    def solve(self, prompt: str) -> str:
        return prompt[prompt.index("#") + 1]


class Phonebook(Task):
    name, train_length, window = "phonebook", 20, 128
    min_length = 3
    syllables = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "di", "go")

    def _name(self, rng: np.random.Generator) -> str:
        return "".join(rng.choice(self.syllables, int(rng.integers(2, 4))))

    def example(self, rng: np.random.Generator, length: int) -> Example:
        self.check_length(length)
        book: dict[str, str] = {}
        while len(book) < length:
            book.setdefault(self._name(rng), "".join(str(d) for d in rng.integers(0, 10, 7)))
        names = list(book)
        asked = [names[i] for i in rng.choice(length, 3, replace=False)]
        lines = "".join(f"{n}:{book[n]}\n" for n in names)
        worked = "".join(f"?{n}={book[n]}\n" for n in asked[:2])
        return Example(f"{lines}{worked}?{asked[2]}=", book[asked[2]])

    def solve(self, prompt: str) -> str:
        body, _, query = prompt.rpartition("?")
        name = query[:-1]
        for line in body.splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1]
        raise ValueError(f"{name!r} is not in the phonebook")


TASKS: dict[str, Task] = {t.name: t for t in (SelectiveCopy(), Induction(), Phonebook())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown probe task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]
