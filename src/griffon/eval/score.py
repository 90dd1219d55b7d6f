"""Validation loss, perplexity and bits per byte.

:func:`evaluate` scores packed batches (the trainer's periodic and final evaluations);
:func:`score_documents` scores whole documents of any length, the cache carried across chunks
(``griffon eval``), with per-document and per-position breakdowns.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from griffon.atomic import atomic_savefig
from griffon.data.tokenizers import Tokenizer
from griffon.decode.generate import prefill
from griffon.model import Cache, Griffon


def byte_table(tokenizer: Tokenizer) -> torch.Tensor:
    """(2, V) UTF-8 bytes per token: row 0 inside a document, row 1 as a document's first token
    (:meth:`~griffon.data.tokenizers.Tokenizer.token_bytes`), the denominators of bits per byte."""
    return torch.from_numpy(np.stack([tokenizer.token_bytes(), tokenizer.token_bytes(document_start=True)]))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict[str, float]:
    """Mean next-token loss (nats/token) and bits per byte over ``batches`` of (tokens, segment_pos),
    each (B, T + 1): the model reads the first T tokens of each row and predicts the last T; or of
    (tokens, segment_pos, targets), where only the tokens marked in ``targets`` are predicted.

    ``token_bytes`` (:func:`byte_table`) gives each token's UTF-8 length, so bits per byte compare
    models whatever their tokenizers. Sums are float64; ``reduce`` combines them across ranks (a mean). The
    model is put back in training mode if it was in it.
    """
    was_training = model.training
    model.eval()
    total = [0.0, 0, 0]  # nats, tokens, bytes
    for tokens, seg, *marked in batches:
        tokens, seg = tokens.to(device), seg.to(device)
        with autocast():
            logits, _ = model(tokens[:, :-1], seg[:, :-1])
        targets = tokens[:, 1:].reshape(1, -1)  # the batch as one row: one sum for all of it
        keep = marked[0][:, 1:].reshape(1, -1).to(device) if marked else torch.ones_like(targets, dtype=torch.bool)
        _accumulate(logits.reshape(1, targets.shape[1], -1), targets, seg[:, 1:].reshape(1, -1), keep,
                    token_bytes.to(device), [total], None)  # fmt: skip
    stats = reduce(torch.tensor(total, dtype=torch.float64, device=device))
    model.train(was_training)
    nats, n, nbytes = stats.tolist()
    return {"val_loss": nats / n, "val_bpb": nats / math.log(2) / nbytes}


@dataclass
class Scores:
    """Summed next-token scores of a set of documents (float64 sums).

    Every token of a document but its first is scored, conditioned on all the tokens before it
    in its document (recurrent and local-attention models) or on the last ``window`` tokens
    (global attention, see :func:`score_documents`).
    """

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    per_doc: list[dict[str, float]] | None = None
    by_position: dict[int, list[float]] | None = None
    """Bucket k holds target positions in [2^k, 2^(k+1)) within their document: [nats, tokens, bytes]."""

    def summary(self) -> dict[str, float]:
        loss = self.nats / max(self.tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": self.nats / math.log(2) / max(self.bytes, 1),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }

    def to_dict(self) -> dict:
        out: dict = self.summary()
        if self.per_doc is not None:
            out["per_doc"] = self.per_doc
        if self.by_position is not None:
            out["by_position"] = [
                {"from": 2**k, "to": 2 ** (k + 1), "loss": n / max(t, 1), "tokens": t, "bytes": b}
                for k, (n, t, b) in sorted(self.by_position.items())
            ]
        return out


# Bound of one chunk's logits (elements, float32: 512 MiB): a recurrent model's chunk is cut to
# max(16, MAX_CHUNK_LOGITS // (vocab x batch)) tokens whatever --seq-len asks, which changes no
# score (the cache carries across chunks); a global-attention model's window is at most its
# max_seq_len (or that bound where it has none).
MAX_CHUNK_LOGITS = 2**27

Document = Sequence[int] | np.ndarray | Iterable[Sequence[int] | np.ndarray]


class _Reader:
    """A document's tokens, read from its pieces as scoring asks for them: it holds one chunk's
    worth and a piece, whatever the document's length. A document given as a sequence of ids is
    one piece; otherwise it is an iterable of pieces (arrays or lists of ids)."""

    def __init__(self, document: Document, limit: int | None) -> None:
        single = isinstance(document, list | tuple | np.ndarray | torch.Tensor)
        self._pieces = iter([document] if single else document)
        self._buf = np.empty(0, dtype=np.int64)
        self._start = 0  # document position of self._buf[0]
        self._limit = limit

    def window(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the document (fewer at its end). ``start`` never goes back:
        the tokens before it are let go."""
        while True:
            drop = min(max(start - self._start, 0), len(self._buf))
            self._buf, self._start = self._buf[drop:], self._start + drop
            if self._start == start and len(self._buf) >= n:
                break
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buf = np.concatenate([self._buf, np.asarray(piece, dtype=np.int64).ravel()])
        if self._start < start:  # the document ends before ``start``
            return self._buf[:0]
        end = n if self._limit is None else max(0, min(n, self._limit - start))
        return self._buf[:end]


@torch.no_grad()
def score_documents(
    model: Griffon,
    documents: Iterable[Document],
    token_bytes: torch.Tensor,
    seq_len: int = 1024,
    batch_size: int = 8,
    stride: int | None = None,
    per_doc: bool = False,
    by_position: bool = False,
    max_len: int | None = None,
    progress: bool = False,
) -> Scores:
    """Score whole documents with ``model``: each a sequence of token ids, or an iterable of
    pieces of one (read as needed, so a document of any length is scored in bounded memory);
    ``documents`` itself is consumed as it goes.

    Recurrent and local-attention models read each document in chunks of ``seq_len`` tokens
    (at most :data:`MAX_CHUNK_LOGITS` logits a chunk), carrying their cache from chunk to chunk,
    so every token is conditioned on its whole document and the result does not depend on
    ``seq_len`` or ``batch_size`` (to float32 rounding of the logits; sums are float64); a batch
    row whose document ends takes the next document. Global-attention models, whose cache grows
    without bound, read windows of ``seq_len`` tokens (at most the model's ``max_seq_len``;
    positions restart at 0 in each window) every ``stride`` tokens (default half a window) and
    score each token once, in the first window that holds it after the window's first ``seq_len -
    stride`` tokens (the first window scores all of its tokens): each token sees at least
    ``seq_len - stride`` tokens of context, up to ``seq_len - 1``.

    ``token_bytes`` (:func:`byte_table`) gives each token's UTF-8 length (bits per byte count the
    scored tokens' bytes). ``max_len`` scores only the first ``max_len`` tokens of each document.
    """
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    if stride is not None and not 0 < stride <= seq_len:
        raise ValueError(f"stride must lie in [1, seq_len={seq_len}], got {stride}")
    model.eval()
    token_bytes = token_bytes.to(model.embed.weight.device)
    scores = Scores(per_doc=[] if per_doc else None, by_position={} if by_position else None)
    rows: list[list[float]] = []  # per document: [nats, tokens, bytes]

    def readers() -> Iterator[tuple[list[float], _Reader]]:
        for doc in documents:
            rows.append([0.0, 0, 0])
            yield rows[-1], _Reader(doc, max_len)

    bar = tqdm(unit="tok", disable=not progress, desc="scoring")
    if model.config.has_global_attention:
        window = min(seq_len, model.config.max_seq_len or MAX_CHUNK_LOGITS // model.config.vocab_size)
        for row, reader in readers():
            _score_windows(model, reader, window, min(stride or max(1, window // 2), window), token_bytes, row,
                           scores.by_position, bar)  # fmt: skip
    else:
        chunk = min(seq_len, max(16, MAX_CHUNK_LOGITS // (model.config.vocab_size * batch_size)))
        _score_stateful(model, readers(), chunk, batch_size, token_bytes, scores.by_position, bar)
    bar.close()
    for nats, n, nbytes in rows:
        scores.nats += nats
        scores.tokens += int(n)
        scores.bytes += int(nbytes)
        scores.documents += 1
        if scores.per_doc is not None:
            scores.per_doc.append({"tokens": int(n), "bytes": int(nbytes), "nats": nats, "loss": nats / max(n, 1),
                                   "bits_per_byte": nats / math.log(2) / max(nbytes, 1)})  # fmt: skip
    return scores


def _accumulate(
    logits: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    token_bytes: torch.Tensor,
    rows: list[list[float]],
    by_position: dict[int, list[float]] | None,
) -> None:
    """Add the scores of ``targets`` (b, t) at document ``positions`` where ``valid`` to each row's sums."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
    nll = torch.where(valid, nll.double(), 0.0)
    nbytes = torch.where(valid, token_bytes[(positions == 0).long(), targets], 0)  # a document's first: row 1
    for r, row in enumerate(rows):
        row[0] += nll[r].sum().item()
        row[1] += int(valid[r].sum())
        row[2] += int(nbytes[r].sum())
    if by_position is not None:
        bucket = torch.log2(positions.clamp_min(1).double()).floor().long()
        for k in bucket[valid].unique().tolist():
            sel = valid & (bucket == k)
            acc = by_position.setdefault(k, [0.0, 0, 0])
            acc[0] += nll[sel].sum().item()
            acc[1] += int(sel.sum())
            acc[2] += int(nbytes[sel].sum())


def _score_stateful(model, readers, chunk, batch_size, token_bytes, by_position, bar) -> None:
    """Documents ``chunk`` tokens at a time in a batch of up to ``batch_size`` rows, each row's cache
    carried across its chunks; a row whose document ends is dropped and the next document joins."""
    device = model.embed.weight.device
    active: list[tuple[list[float], _Reader, int]] = []  # (sums, reader, next input position)
    cache = None
    while True:
        joining = list(itertools.islice(readers, batch_size - len(active)))
        if joining:
            fresh = model.init_cache(len(joining))
            cache = fresh if cache is None else Cache.stack([cache, fresh])
            active += [(row, reader, 0) for row, reader in joining]
        if not active:
            return
        windows = [reader.window(start, chunk + 1) for _, reader, start in active]  # inputs and the next token
        t = max(len(w) for w in windows) - 1
        if t > 0:
            tokens = torch.zeros(len(active), t + 1, dtype=torch.long)
            for r, w in enumerate(windows):
                tokens[r, : len(w)] = torch.from_numpy(w)
            tokens = tokens.to(device)
            starts = torch.tensor([start for _, _, start in active], device=device)[:, None]
            steps = torch.arange(t, device=device)[None]
            lengths = torch.tensor([len(w) for w in windows], device=device)[:, None]
            logits, cache = model(tokens[:, :-1], starts + steps, cache=cache)  # token p predicts token p + 1
            valid = steps + 1 < lengths
            _accumulate(logits, tokens[:, 1:], starts + steps + 1, valid, token_bytes, [row for row, _, _ in active],
                        by_position)  # fmt: skip
            bar.update(int(valid.sum()))
        keep = [r for r, w in enumerate(windows) if len(w) == chunk + 1]  # the rest have reached their end
        if len(keep) < len(active):
            cache = cache.select(torch.tensor(keep, device=device)) if keep else None
        active = [(row, reader, start + chunk) for r, (row, reader, start) in enumerate(active) if r in keep]


def _score_windows(model, reader, window, stride, token_bytes, row, by_position, bar) -> None:
    """One document through sliding windows of ``window`` tokens every ``stride`` tokens."""
    device = model.embed.weight.device
    scored = 0  # targets up to this position are done
    start = 0
    while True:
        tokens = torch.from_numpy(reader.window(start, window)).to(device)
        end = start + len(tokens)
        if len(tokens) < 2 or end - 1 <= scored:
            return
        inputs, targets = tokens[:-1][None], tokens[1:][None]
        logits, _ = model(inputs, torch.arange(len(tokens) - 1, device=device)[None])
        positions = torch.arange(start + 1, end, device=device)[None]
        valid = positions > scored
        _accumulate(logits, targets, positions, valid, token_bytes, [row], by_position)
        bar.update(int(valid.sum()))
        scored = end - 1
        start += stride


@torch.no_grad()
def score_continuations(
    model: Griffon,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    chunk: int = 1024,
) -> list[tuple[float, bool]]:
    """For each ``(context, continuation)`` pair of token ids: the log-probability of the
    continuation given the context, and whether greedy decoding would produce it (what
    lm-evaluation-harness asks of ``loglikelihood``).

    Requests that share a context (the choices of a multiple-choice question) prefill it once;
    each continuation then starts from a copy of that cache (a recurrent model's state is
    fixed-size, so the copies are cheap). Up to ``batch_size`` distinct contexts are prefilled
    together (:func:`~griffon.decode.generate.prefill` with padding, longest first so that
    neighbours have similar lengths), then their continuations run ``batch_size`` rows at a
    time, longest first, padded at their ends only, where padding cannot reach the scored tokens.
    """
    model.eval()
    device = model.embed.weight.device
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(requests):
        if len(context) == 0 or len(continuation) == 0:
            raise ValueError(f"request {i}: context and continuation must both hold tokens")
        by_context.setdefault(tuple(context), []).append(i)
    contexts = sorted(by_context, key=len, reverse=True)
    for g in range(0, len(contexts), batch_size):
        group = contexts[g : g + batch_size]
        last, cache = prefill(model, group, chunk, pad=True)  # (n, V): predicts each first token
        rows = [(c, i) for c, context in enumerate(group) for i in by_context[context]]
        rows.sort(key=lambda row: len(requests[row[1]][1]), reverse=True)  # little padding in each batch
        for b in range(0, len(rows), batch_size):
            part = rows[b : b + batch_size]
            conts = [list(requests[i][1]) for _, i in part]
            which = torch.tensor([c for c, _ in part], device=device)
            targets = torch.zeros(len(part), max(map(len, conts)), dtype=torch.long, device=device)  # (R, T)
            for r, c in enumerate(conts):
                targets[r, : len(c)] = torch.as_tensor(c, device=device)
            logits = last[which][:, None]  # (R, 1, V)
            if targets.shape[1] > 1:
                more, _ = model(targets[:, :-1], cache=cache.select(which))  # (R, T-1, V)
                logits = torch.cat([logits, more], dim=1)
            # log-softmax in float32 whatever the compute dtype; each sum in float64
            logp = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]  # (R, T)
            scored = (
                torch.arange(targets.shape[1], device=device)
                < torch.tensor(list(map(len, conts)), device=device)[:, None]
            )
            totals = logp.double().masked_fill(~scored, 0.0).sum(-1).tolist()
            greedy = ((logits.argmax(-1) == targets) | ~scored).all(-1).tolist()
            for (_, i), total, hit in zip(part, totals, greedy, strict=True):
                results[i] = (total, hit)
    return results  # type: ignore[return-value]


def plot_by_position(results: dict[str, dict], path: str | Path, train_len: int | None = None) -> None:
    """Loss against token position (log-spaced buckets), one line per evaluated model, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        buckets = [b for b in result["by_position"] if b["tokens"]]
        ax.plot([math.sqrt(b["from"] * b["to"]) for b in buckets], [b["loss"] for b in buckets], "o-", ms=3, label=name)
    if train_len:
        ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position in document")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
