"""A post-training run's examples (SFT, DPO, QRPO): read from JSON Lines, each line named where
it is wrong; the tokenizer they are read with; their split; what they teach within ``seq_len``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from griffon.data.sources import DataError
from griffon.data.tokenizers import Tokenizer, TokenizerError, bpe_vocab_size, load_tokenizer
from griffon.files import iter_lines


def read_objects(path: str | Path, what: str = "a JSONL file") -> Iterator[tuple[str, dict]]:
    """Each non-blank line of ``path`` as a JSON object, with ``FILE:LINE`` to name it in errors,
    streamed a bounded line at a time (:func:`griffon.files.iter_lines`);
    :class:`~griffon.files.FileError` for a file that cannot be read within its bounds,
    :class:`DataError` for a line that is not a JSON object."""
    path = Path(path)
    for number, line in iter_lines(path, what):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: an example is a JSON object")
        yield where, obj


def split_examples(examples: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split into training and validation examples (at least one of each)."""
    if len(examples) < 2:
        raise DataError("post-training needs at least 2 examples: one to train on, one to validate with")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(max(1, round(val_fraction * len(examples))), len(examples) - 1)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def first_target(mask: list[bool]) -> int | None:
    """The smallest ``data.seq_len`` at which an example (its loss mask) has a token to learn: its
    first target past the row's first token, which nothing predicts (None: it has none)."""
    return next((i for i, m in enumerate(mask) if m and i > 0), None)


def check_learnable(needs: list[int | None], val_needs: list[int | None], seq_len: int, what: str) -> int:
    """Count the examples with no token to learn within ``seq_len`` (``needs``: each training
    example's smallest such ``seq_len``, None where none is; ``val_needs`` the validation
    examples'). Refuse, with how many and which ``data.seq_len`` would keep them, when none or most
    of them are, or every validation example is (the validation loss would be of nothing); else
    return how many there are, for the caller to warn of."""
    every = needs + val_needs
    lost = [n for n in every if n is None or n > seq_len]
    if lost and (2 * len(lost) > len(every) or all(n is None or n > seq_len for n in val_needs)):
        reachable = [n for n in lost if n is not None]
        if len(reachable) == len(lost):
            hint = f"; data.seq_len={max(reachable)} would keep them all"
        elif reachable:
            hint = f"; data.seq_len={max(reachable)} would keep {len(reachable)}, no length the others"
        else:
            hint = " at any data.seq_len"
        where = "" if 2 * len(lost) > len(every) else ", every validation example among them"
        raise DataError(
            f"{len(lost)} of the {len(every)} {what} have no token to learn within data.seq_len={seq_len}{where}{hint}"
        )
    return len(lost)


def examples_tokenizer(objective: str, path: str | None, tokenizer_spec: str, vocab_size: int) -> Tokenizer:
    """Check that ``path`` is a file of examples for ``objective`` and load the tokenizer they are
    read with: the model's own (a new BPE is refused), whose ids its vocabulary holds."""
    if path is None or not Path(path).is_file():
        raise DataError(f"objective={objective} reads a JSONL file of examples: data.path={path!r} is not a file")
    if bpe_vocab_size(tokenizer_spec) is not None:
        raise DataError(f"objective={objective} needs the model's own tokenizer (start with --init), not a new BPE")
    try:
        tokenizer = load_tokenizer(tokenizer_spec)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens, model.vocab_size only {vocab_size}")
    return tokenizer


def example_warnings(truncated: tuple[int, int], unlearnable: int, seq_len: int) -> list[str]:
    """What a run is told of its examples: those cut to a row (training, validation) and those
    with no token to learn within ``seq_len``."""
    out = [f"{n} {name} examples are longer than data.seq_len + 1 and cut"
           for n, name in zip(truncated, ("training", "validation"), strict=True) if n]  # fmt: skip
    if unlearnable:
        out.append(f"{unlearnable} examples have no token to learn within data.seq_len={seq_len}")
    return out
