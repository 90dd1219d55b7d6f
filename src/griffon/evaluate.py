"""Validation loss and bits per byte: the core the trainer calls and a standalone evaluator builds on."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F


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
    each (B, T + 1): the model reads the first T tokens of each row and predicts the last T.

    ``token_bytes`` (V,) gives each token's UTF-8 length, so bits per byte compare models whatever
    their tokenizers. Sums are float64; ``reduce`` combines them across ranks (a mean). The
    model is put back in training mode if it was in it.
    """
    was_training = model.training
    model.eval()
    total_nats = total_tokens = total_bytes = 0.0
    for tokens, seg in batches:
        tokens, seg = tokens.to(device), seg.to(device)
        with autocast():
            logits, _ = model(tokens[:, :-1], seg[:, :-1])
        targets = tokens[:, 1:].flatten()
        total_nats += F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="sum").item()
        total_tokens += targets.numel()
        total_bytes += token_bytes[targets.cpu()].sum().item()
    stats = reduce(torch.tensor([total_nats, total_tokens, total_bytes], dtype=torch.float64, device=device))
    model.train(was_training)
    nats, n, nbytes = stats.tolist()
    return {"val_loss": nats / n, "val_bpb": nats / math.log(2) / nbytes}
