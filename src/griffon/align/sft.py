"""Supervised fine-tuning data: ``objective=sft`` on JSONL of instructions or chats.

Each line is ``{"prompt": ..., "completion": ...}`` or ``{"messages": [{"role", "content"}, ...]}``.
A prompt-completion pair is the prompt's tokens then the completion's (and the tokenizer's EOS,
where it has one); a chat is rendered with the model's chat template (:mod:`griffon.align.chat`),
each assistant turn being the text its template adds to the conversation before it
(``render(messages[:i+1]) - render(messages[:i], add_generation_prompt=True)``: the reply and its
end of turn). The loss counts the completion's or the assistant turns' tokens only, averaged over
every such token of the batch (TRL's ``completion_only_loss`` / ``assistant_only_loss`` with its
default token-mean normalisation).

Examples are packed whole into rows of ``seq_len + 1`` tokens (best fit, longest first, as TRL's
``bfd`` packing), each starting at ``segment_pos`` 0, so the model resets its state at every
example and no example sees another; the first token of an example is never a target (it would be
predicted from the example before it), and the row's padding is never one. An example longer than a
row is cut to its first ``seq_len + 1`` tokens (and counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from griffon.align.chat import ChatTemplate, ChatTemplateError, check_messages
from griffon.align.jsonl import read_objects
from griffon.data.sources import DataError
from griffon.data.tokenizers import Tokenizer

Example = tuple[list[int], list[bool]]
"""An example's token ids and, per token, whether it is a target of the loss."""


def read_examples(path: str | Path, template: ChatTemplate | None = None) -> list[dict]:
    """The examples of a JSONL file, each checked (with ``template``, each chat rendered too);
    :class:`DataError` naming the file and line."""
    examples = []
    for where, ex in read_objects(path):
        if "messages" in ex:
            try:
                check_messages(ex["messages"])
            except ChatTemplateError as e:
                raise DataError(f"{where}: {e}") from None
            if not any(m["role"] == "assistant" and m["content"] for m in ex["messages"]):
                raise DataError(f"{where}: the chat has no assistant turn with content to learn")
            if template is not None:
                try:
                    template.render(ex["messages"], add_generation_prompt=False)
                except ChatTemplateError as e:
                    raise DataError(f"{where}: {e}") from None
        elif "prompt" in ex or "completion" in ex:
            for key in ("prompt", "completion"):
                if not isinstance(ex.get(key), str):
                    raise DataError(f"{where}: {key!r} must be a string")
            if not ex["completion"]:
                raise DataError(f"{where}: the completion is empty")
        else:
            raise DataError(f'{where}: an example has "prompt" and "completion", or "messages"')
        examples.append(ex)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def tokenize_example(ex: dict, tokenizer: Tokenizer, template: ChatTemplate) -> Example:
    """An example's token ids and its loss mask (True on the completion or the assistant turns)."""
    if "messages" not in ex:
        completion = tokenizer.encode(ex["completion"])
        if tokenizer.eos_id is not None:
            completion.append(tokenizer.eos_id)
        prompt = tokenizer.encode(ex["prompt"])
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    messages = ex["messages"]
    ids: list[int] = []
    mask: list[bool] = []
    done = ""  # the text rendered so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True) if i else ""
        after = template.render(messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ChatTemplateError("the chat template renders a conversation's start differently as it grows")
        context = tokenizer.encode(before[len(done) :])
        reply = tokenizer.encode(after[len(before) :])
        ids += context + reply
        mask += [False] * len(context) + [True] * len(reply)
        done = after
    return ids, mask


@dataclass
class PackedRows:
    """Examples packed into rows: tokens, segment positions and targets, each (rows, seq_len + 1)."""

    tokens: np.ndarray
    segment_pos: np.ndarray
    targets: np.ndarray
    """True where the token is a target of the loss."""
    truncated: int
    """Examples cut to a row's length."""


def pack(examples: list[Example], seq_len: int) -> PackedRows:
    """Best-fit-decreasing packing of whole examples into rows of ``seq_len + 1`` tokens."""
    width = seq_len + 1
    truncated = sum(len(ids) > width for ids, _ in examples)
    items = sorted(((ids[:width], mask[:width]) for ids, mask in examples), key=lambda e: -len(e[0]))
    rows: list[list[Example]] = []
    free: list[int] = []
    for ids, mask in items:
        fits = [r for r, room in enumerate(free) if room >= len(ids)]
        if fits:
            r = min(fits, key=lambda r: free[r])
        else:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append((ids, mask))
        free[r] -= len(ids)
    tokens = np.zeros((len(rows), width), dtype=np.int64)
    seg = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.zeros((len(rows), width), dtype=bool)
    for r, row in enumerate(rows):
        at = 0
        for ids, mask in row:
            n = len(ids)
            tokens[r, at : at + n] = ids
            seg[r, at : at + n] = np.arange(n)
            targets[r, at : at + n] = mask
            targets[r, at] = False  # predicted from the example before it
            at += n
        seg[r, at:] = np.arange(width - at)  # padding: its own segment, never a target
    return PackedRows(tokens, seg, targets, truncated)


class ShuffledLoader:
    """Batches of ``batch_size`` of ``n`` items for this rank, the items shuffled every epoch
    (seeded by ``seed + epoch``); the position is (epoch, step). A subclass says what an item is
    (:meth:`take`)."""

    unit, hint = "items", "lower data.batch_size"
    """What an item is, and what to do when there are too few, for the message that says so."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n} {self.unit} cannot fill one step of {world_size} x {batch_size}; {self.hint}")
        self.epoch, self.step = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def take(self, items: np.ndarray) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def __iter__(self) -> ShuffledLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng(self.seed + self.epoch).permutation(self.n))
        first = (self.step * self.world_size + self.rank) * self.batch_size
        self.step += 1
        return self.take(self._order[1][first : first + self.batch_size])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.seed = int(state["epoch"]), int(state["step"]), int(state["seed"])
        self._order = None


def in_batches(n: int, batch_size: int, max_batches: int | None, take) -> Iterator[tuple[torch.Tensor, ...]]:
    """``take`` of items 0..n-1 in order, ``batch_size`` at a time (the first ``max_batches`` batches)."""
    for start in range(0, n, batch_size)[:max_batches]:
        yield take(np.arange(start, min(start + batch_size, n)))


def batch_count(n: int, batch_size: int, max_batches: int | None = None) -> int:
    """How many batches :func:`in_batches` yields for these arguments."""
    count = -(-n // batch_size)
    return count if max_batches is None else min(count, max_batches)


class SFTLoader(ShuffledLoader):
    """Yields ``(tokens, segment_pos, targets)``, each (batch_size, seq_len + 1): packed rows."""

    unit, hint = "packed rows of examples", "lower data.batch_size or data.seq_len"

    def __init__(self, rows: PackedRows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.rows = rows
        super().__init__(len(rows.tokens), batch_size, seed, rank, world_size)

    def take(self, items: np.ndarray) -> tuple[torch.Tensor, ...]:
        return rows_of(self.rows, items)


def rows_of(rows: PackedRows, items: np.ndarray) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a[items]) for a in (rows.tokens, rows.segment_pos, rows.targets))


def eval_batches(rows: PackedRows, batch_size: int, max_batches: int | None = None):
    """The rows in order, ``batch_size`` at a time (the first ``max_batches`` batches)."""
    return in_batches(len(rows.tokens), batch_size, max_batches, lambda items: rows_of(rows, items))


def split_examples(examples: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split into training and validation examples (at least one of each)."""
    if len(examples) < 2:
        raise DataError("SFT needs at least 2 examples: one to train on, one to validate with")
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
    from griffon.data.tokenizers import TokenizerError, bpe_vocab_size, load_tokenizer

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


@dataclass
class SFTData:
    """A run's SFT data, read, checked and packed before anything is written."""

    tokenizer: Tokenizer
    train: PackedRows
    val: PackedRows
    unlearnable: int = 0
    """Examples with no token to learn within ``seq_len`` (a few are trained on for nothing)."""

    @classmethod
    def open(cls, path: str | None, tokenizer_spec: str, template_file: str | None, seq_len: int,
             val_fraction: float, seed: int, vocab_size: int) -> SFTData:  # fmt: skip
        """Read ``path`` (JSONL), split off ``val_fraction`` of the examples for validation,
        tokenize with ``tokenizer_spec`` (``bytes`` or a file: the model's, from ``--init``) and
        the chat template, and pack both splits. :class:`DataError` naming what is wrong."""
        from griffon.align.chat import template_for

        tokenizer = examples_tokenizer("sft", path, tokenizer_spec, vocab_size)
        try:
            template = template_for(tokenizer, template_file)
        except ChatTemplateError as e:
            raise DataError(str(e)) from None
        train, val = split_examples(read_examples(path, template), val_fraction, seed)
        try:
            tokenized = [[tokenize_example(ex, tokenizer, template) for ex in split] for split in (train, val)]
        except ChatTemplateError as e:
            raise DataError(f"{path}: {e}") from None
        needs = [[first_target(mask) for _, mask in split] for split in tokenized]
        unlearnable = check_learnable(*needs, seq_len, "examples")
        return cls(tokenizer, *(pack(split, seq_len) for split in tokenized), unlearnable)

    def loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> SFTLoader:
        return SFTLoader(self.train, batch_size, seed, rank, world_size)

    def eval_batches(self, batch_size: int, max_batches: int | None = None):
        return eval_batches(self.val, batch_size, max_batches)

    def eval_batch_count(self, batch_size: int, max_batches: int | None = None) -> int:
        return batch_count(len(self.val.tokens), batch_size, max_batches)
