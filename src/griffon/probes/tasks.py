"""Synthetic probe tasks, rendered as text so that byte-level models train on them and any
checkpoint with a text tokenizer can be probed (``griffon probe``).

Each task draws an example of a given length from a seeded generator: a prompt and the answer
the model must continue it with, and solves a prompt itself (a tiny solver the tests check the
generator against). The registry :data:`TASKS` maps a name to its task class; a new task is one
class. A task's parameters are dataclass fields with the paper's settings as defaults
(``griffon probe train --param data_tokens=8`` changes one).

* ``selective-copy`` (Griffin paper, Section 6.1, after Gu and Dao's Mamba): ``length`` symbols,
  ``data_tokens`` (16) of them data letters (``a``-``p``, the paper's vocabulary of 16) at random
  positions, the rest the noise symbol ``.``; then ``=``; the answer is the data letters in order.
* ``induction`` (Section 6.1): ``length`` random letters ``a``-``p`` in which the trigger ``#`` occurs
  once, followed by a letter; the prompt ends with ``#`` again; the answer is that letter.
* ``phonebook`` (Section 6.2, after Jelassi et al. 2024, "Repeat After Me"): ``length`` entries
  ``name:number`` one a line (names of 2-3 random syllables, ``digits``-digit numbers), then
  ``worked`` (2) lookups ``?name=number`` and a last ``?name=`` whose number is the answer. Its
  length is the phonebook's size, in entries.

Renderings: for byte-level models the symbols are written side by side (``a..c.#``), one byte a
symbol. A subword tokenizer would merge such runs into arbitrary tokens, so for any other
tokenizer copying and induction are written ``spaced``, the symbols separated by single spaces
(``a . . c . #``, the answer `` c``), where common tokenizers give each symbol a token of its own;
phonebook is names and numbers either way. An answer is read back as its symbols, whitespace
dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def symbols(text: str) -> str:
    """The symbols of a rendered answer or completion: its text without whitespace."""
    return "".join(text.split())


@dataclass(frozen=True)
class Task:
    """A probe task: examples of a length, and their solution from the prompt alone."""

    name: ClassVar[str]
    train_length: ClassVar[int]
    """The training length: the paper's where it trains on the task (scaled where the CPU needs it:
    the probe command says so)."""
    window: ClassVar[int]
    """Griffin's local attention window: the paper's where it trains on the task."""

    @property
    def min_length(self) -> int:
        raise NotImplementedError

    @property
    def max_length(self) -> int | None:
        """The longest example the task can draw (``None``: no bound of its own)."""
        return None

    def prompt_bytes(self, length: int, spaced: bool = False) -> int:
        """An upper bound on the bytes of a prompt of ``length``, known without drawing one."""
        raise NotImplementedError

    def example(self, rng: np.random.Generator, length: int, spaced: bool = False) -> Example:
        raise NotImplementedError

    def solve(self, prompt: str) -> str:
        raise NotImplementedError

    def check_length(self, length: int) -> None:
        if length < self.min_length:
            raise ValueError(f"{self.name}: length {length} is below the task's minimum {self.min_length}")
        if self.max_length is not None and length > self.max_length:
            raise ValueError(f"{self.name}: length {length} is above the task's maximum {self.max_length}")

    def validate(self) -> None:
        """Refuse parameters the task cannot be drawn with."""

    @staticmethod
    def _symbols_bytes(symbols: int, spaced: bool) -> int:
        return 2 * symbols - 1 if spaced else symbols

    @staticmethod
    def _join(prompt: list[str], answer: list[str], spaced: bool) -> Example:
        sep = " " if spaced else ""
        return Example(sep.join(prompt), sep + sep.join(answer))


@dataclass(frozen=True)
class SelectiveCopy(Task):
    name, train_length, window = "selective-copy", 1024, 512
    data_tokens: int = 16
    vocab: int = 16

    @property
    def min_length(self) -> int:
        return self.data_tokens

    def prompt_bytes(self, length: int, spaced: bool = False) -> int:
        return self._symbols_bytes(length + 1, spaced)  # the symbols, then "="

    def validate(self) -> None:
        _check_range(self.name, "vocab", self.vocab, 2, len(ALPHABET))
        _check_range(self.name, "data_tokens", self.data_tokens, 1, None)

    def example(self, rng: np.random.Generator, length: int, spaced: bool = False) -> Example:
        self.check_length(length)
        seq = ["."] * length
        positions = np.sort(rng.choice(length, self.data_tokens, replace=False))
        letters = [str(c) for c in rng.choice(list(ALPHABET[: self.vocab]), self.data_tokens)]
        for at, letter in zip(positions, letters, strict=True):
            seq[at] = letter
        return self._join([*seq, "="], letters, spaced)

    def solve(self, prompt: str) -> str:
        spaced = " " in prompt
        letters = [c for c in symbols(prompt)[:-1] if c != "."]
        return (" " if spaced else "") + (" " if spaced else "").join(letters)


@dataclass(frozen=True)
class Induction(Task):
    name, train_length, window = "induction", 256, 128
    vocab: int = 16

    @property
    def min_length(self) -> int:
        return 3

    def prompt_bytes(self, length: int, spaced: bool = False) -> int:
        return self._symbols_bytes(length + 1, spaced)  # the letters, then the trigger again

    def validate(self) -> None:
        _check_range(self.name, "vocab", self.vocab, 2, len(ALPHABET))

    def example(self, rng: np.random.Generator, length: int, spaced: bool = False) -> Example:
        self.check_length(length)
        seq = [str(c) for c in rng.choice(list(ALPHABET[: self.vocab]), length)]
        at = int(rng.integers(0, length - 1))
        seq[at] = "#"
        return self._join([*seq, "#"], [seq[at + 1]], spaced)

    def solve(self, prompt: str) -> str:
        flat = symbols(prompt)
        return (" " if " " in prompt else "") + flat[flat.index("#") + 1]


@dataclass(frozen=True)
class Phonebook(Task):
    # The paper probes its pretrained models on phonebooks and trains none on the task, so the
    # training length and window here are griffon's choices, not the paper's settings.
    name, train_length, window = "phonebook", 20, 128
    digits: int = 7
    worked: int = 2
    syllables: ClassVar[tuple[str, ...]] = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "di", "go")

    @property
    def min_length(self) -> int:
        return self.worked + 1

    @property
    def max_length(self) -> int:
        """As many entries as there are distinct names of 2-3 syllables."""
        n = len(self.syllables)
        return n**2 + n**3

    def prompt_bytes(self, length: int, spaced: bool = False) -> int:
        name = 2 * 3  # three syllables of two letters at most
        return length * (name + self.digits + 2) + self.worked * (name + self.digits + 3) + name + 2

    def validate(self) -> None:
        _check_range(self.name, "digits", self.digits, 1, None)
        _check_range(self.name, "worked", self.worked, 0, None)

    def _name(self, rng: np.random.Generator) -> str:
        return "".join(rng.choice(self.syllables, int(rng.integers(2, 4))))

    def example(self, rng: np.random.Generator, length: int, spaced: bool = False) -> Example:
        self.check_length(length)
        book: dict[str, str] = {}
        while len(book) < length:
            book.setdefault(self._name(rng), "".join(str(d) for d in rng.integers(0, 10, self.digits)))
        names = list(book)
        asked = [names[i] for i in rng.choice(length, self.worked + 1, replace=False)]
        lines = "".join(f"{n}:{book[n]}\n" for n in names)
        worked = "".join(f"?{n}={book[n]}\n" for n in asked[:-1])
        return Example(f"{lines}{worked}?{asked[-1]}=", book[asked[-1]])

    def solve(self, prompt: str) -> str:
        body, _, query = prompt.rpartition("?")
        name = query[:-1]
        for line in body.splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1]
        raise ValueError(f"{name!r} is not in the phonebook")


def _check_range(task: str, key: str, value: int, low: int, high: int | None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{task}: {key} must be {bound}, got {value}")


CPU_SCALE = 4
"""The default training length and Griffin window are the paper's divided by this (a CPU's budget)."""

TASKS: dict[str, type[Task]] = {t.name: t for t in (SelectiveCopy, Induction, Phonebook)}


def get_task(name: str, params: list[str] | None = None) -> Task:
    """The task ``name`` with ``params`` (``KEY=VALUE`` strings, integers) over its defaults."""
    if name not in TASKS:
        raise ValueError(f"unknown probe task {name!r}; tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, int] = {}
    for item in params or []:
        key, eq, value = item.partition("=")
        if not eq or key not in known:
            hint = f"; {name} takes {', '.join(sorted(known))}" if known else f"; {name} takes none"
            raise ValueError(f"bad probe parameter {item!r}{hint}")
        try:
            values[key] = int(value)
        except ValueError:
            raise ValueError(f"probe parameter {key} must be an integer, got {value!r}") from None
    task = cls(**values)
    task.validate()
    return task
