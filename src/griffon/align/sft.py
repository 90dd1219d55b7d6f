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
from functools import partial
from pathlib import Path

import numpy as np
import torch

from griffon.align.chat import ChatTemplate, ChatTemplateError, check_messages
from griffon.align.examples import (
    check_learnable,
    example_warnings,
    examples_tokenizer,
    first_target,
    read_objects,
    split_examples,
)
from griffon.data.loader import ShuffledLoader, eval_batch_count, eval_batches
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


class SFTLoader(ShuffledLoader):
    """Yields ``(tokens, segment_pos, targets)``, each (batch_size, seq_len + 1): packed rows."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(len(rows.tokens), partial(rows_of, rows), batch_size, seed, rank, world_size,
                         unit="packed rows of examples", hint="lower data.batch_size or data.seq_len")  # fmt: skip


def rows_of(rows: PackedRows, items: np.ndarray) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a[items]) for a in (rows.tokens, rows.segment_pos, rows.targets))


@dataclass
class SFTData:
    """A run's SFT data, read, checked and packed before anything is written."""

    tokenizer: Tokenizer
    train: PackedRows
    val: PackedRows
    unlearnable: int = 0
    """Examples with no token to learn within ``seq_len`` (a few are trained on for nothing)."""

    @property
    def seq_len(self) -> int:
        return self.train.tokens.shape[1] - 1

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

    def prepare(self) -> None:
        """Nothing to write: the examples were read, tokenized and packed by :meth:`open`."""

    def warnings(self) -> list[str]:
        return example_warnings((self.train.truncated, self.val.truncated), self.unlearnable, self.seq_len)

    def loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> SFTLoader:
        return SFTLoader(self.train, batch_size, seed, rank, world_size)

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        return eval_batches(len(self.val.tokens), partial(rows_of, self.val), batch_size, max_batches)

    def eval_batch_count(self, batch_size: int, max_batches: int | None = None) -> int:
        return eval_batch_count(len(self.val.tokens), batch_size, max_batches)
