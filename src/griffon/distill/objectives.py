"""Distillation's two objectives, trained by griffon's own trainer (``objective=distill_align`` and
``objective=distill``; :data:`griffon.train.objective.OBJECTIVES`).

1. **Attention transfer** (:class:`AttentionTransfer`): each new recurrent block learns to give
   the output of the attention layer it replaces, on the teacher's own inputs to that layer (its
   normed residual stream), by mean squared error, as LoLCATs (Zhang et al. 2024, arXiv
   2410.10254) trains its linear attentions and MOHAWK (Bick et al. 2024, arXiv 2408.10189) aligns
   hidden states; one teacher forward gives every layer's pair, and only the new blocks train.
2. **End-to-end distillation** (:class:`Distillation`): the student's next-token distribution is
   pulled to the teacher's, ``T^2 KL(p_teacher^T || p_student^T)`` at temperature ``T`` (Hinton et
   al. 2015), over the teacher's ``top_k`` tokens if set, plus ``ce_weight`` times the
   cross-entropy on the data.

The teacher is frozen, in eval mode, on the student's device, under the run's autocast.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from griffon.checkpoint import open_source
from griffon.data.tokenizers import load_tokenizer
from griffon.distill.student import DistillError, check_student, init_student
from griffon.eval.score import evaluate
from griffon.model import Griffon


def check_distillation(teacher: str, student, init: str, tokenizer_spec: str) -> None:
    """Refuse, in one line and before anything is written, a teacher that cannot be read, a
    student that cannot take its weights (naming the tensor and both shapes) or data read with
    another tokenizer than the teacher's."""
    source = open_source(teacher)
    check_student(source.shapes(), source.config, student, init)
    if source.tokenizer is None:
        raise DistillError(f"the teacher {teacher} has no tokenizer: the student must read its tokens")
    if tokenizer_spec == "bytes" or load_tokenizer(tokenizer_spec).describe() != source.tokenizer.describe():
        raise DistillError(
            f"data.tokenizer {tokenizer_spec!r} is not the teacher's ({source.tokenizer.path}): the student must "
            "read the teacher's tokens"
        )


def open_teacher(path: str, student: Griffon, init: str, start_from_teacher: bool) -> Griffon:
    """The teacher, frozen, on the student's device and in its dtype; with ``start_from_teacher``
    the student takes the teacher's shared tensors and its new blocks start as ``init`` says
    (:func:`~griffon.distill.student.init_student`)."""
    weight = student.embed.weight
    teacher = open_source(path).model(device=weight.device, dtype=weight.dtype).eval().requires_grad_(False)
    if start_from_teacher:
        init_student(student, teacher, init)
    return teacher


def freeze(student: Griffon, names: list[str]) -> None:
    """Stop the gradients of the named parameters (the optimizer then leaves them as they are)."""
    params = dict(student.named_parameters())
    for name in names:
        if name in params:
            params[name].requires_grad_(False)


class AttentionTransfer:
    """Stage 1: each new recurrent block's output against the replaced attention's, per layer."""

    def __init__(self, student: Griffon, teacher: Griffon) -> None:
        self.student, self.teacher = student, teacher
        self.layers = [i for i, kind in enumerate(student.config.block_types) if kind == "recurrent"]
        if not self.layers:
            raise DistillError("the student replaces no attention layer: nothing to align")
        freeze(student, [n for n, _ in student.named_parameters()])
        for i in self.layers:
            student.blocks[i].temporal.requires_grad_(True)

    def _errors(self, batch: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each replaced layer's mean squared error and its error relative to the target's mean square."""
        tokens, seg = batch[0], batch[1]
        pairs: dict[int, tuple] = {}

        def keep(i):
            def hook(module, args, output):
                pairs[i] = (args[0], args[1], args[2], output[0])

            return hook

        handles = [self.teacher.blocks[i].temporal.register_forward_hook(keep(i)) for i in self.layers]
        try:
            with torch.no_grad():
                self.teacher(tokens[:, :-1], seg[:, :-1])
        finally:
            for h in handles:
                h.remove()
        mse, rel = [], []
        for i in self.layers:
            x, segment_pos, positions, target = pairs[i]  # x (B, T, D): the teacher's normed input
            out, _ = self.student.blocks[i].temporal(x, segment_pos, positions, None)
            err = (out.float() - target.float()).pow(2).mean()
            mse.append(err)
            rel.append(err.detach() / target.float().pow(2).mean().clamp_min(1e-30))
        return mse, rel

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        mse, rel = self._errors(batch)
        return torch.stack(mse).mean(), {f"align_{i}": float(r) for i, r in zip(self.layers, rel, strict=True)}

    @torch.no_grad()
    def evaluate(self, model, batches, device, autocast, reduce) -> dict[str, float]:
        """The mean squared error (``val_loss``) and each layer's relative error over ``batches``."""
        sums = torch.zeros(1 + len(self.layers), dtype=torch.float64, device=device)
        n = 0
        for batch in batches:
            with autocast():
                mse, rel = self._errors(tuple(t.to(device) for t in batch))
            sums += torch.tensor([float(torch.stack(mse).mean()), *map(float, rel)], dtype=torch.float64, device=device)
            n += 1
        means = reduce(sums / max(n, 1)).tolist()
        return {"val_loss": means[0]} | {f"val_align_{i}": m for i, m in zip(self.layers, means[1:], strict=True)}


class Distillation:
    """Stage 2: KL to the teacher's next-token distribution, plus ``ce_weight`` cross-entropy."""

    def __init__(self, teacher: Griffon, token_bytes: torch.Tensor, temperature: float = 1.0,
                 top_k: int | None = None, ce_weight: float = 0.0) -> None:  # fmt: skip
        self.teacher, self.token_bytes = teacher, token_bytes
        self.temperature, self.top_k, self.ce_weight = temperature, top_k, ce_weight
        self._teacher_eval: dict[int, dict[str, float]] = {}  # by the number of batches evaluated

    def _terms(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token KL to the teacher (at the temperature) and cross-entropy, each (B T,) float32."""
        tokens, seg = batch[0], batch[1]
        inputs, seg_in, targets = tokens[:, :-1], seg[:, :-1], tokens[:, 1:]
        logits, _ = model(inputs, seg_in)  # (B, T, V)
        with torch.no_grad():
            teacher, _ = self.teacher(inputs, seg_in)
        s = logits.float().flatten(0, 1) / self.temperature  # (B T, V)
        t = teacher.float().flatten(0, 1) / self.temperature
        log_q = F.log_softmax(s, dim=-1)
        if self.top_k is not None:  # the teacher's top-k tokens, its probabilities renormalised over them
            t, index = t.topk(self.top_k, dim=-1)  # (B T, k)
            log_q = log_q.gather(-1, index)
        log_p = F.log_softmax(t, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B T,)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return kl, ce

    def _loss(self, kl: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        loss = self.temperature**2 * kl.mean()
        return loss + self.ce_weight * ce.mean() if self.ce_weight else loss

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        kl, ce = self._terms(model, batch)
        return self._loss(kl, ce), {"kl": float(kl.detach().mean()), "ce": float(ce.detach().mean())}

    @torch.no_grad()
    def evaluate(self, model, batches, device, autocast, reduce) -> dict[str, float]:
        """The objective (``val_loss``), the KL to the teacher, and the student's and the teacher's
        cross-entropy and bits per byte over ``batches`` (the teacher's computed once)."""
        batches = list(batches)
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # objective, kl, tokens
        for batch in batches:
            with autocast():
                kl, ce = self._terms(model, tuple(t.to(device) for t in batch))
            sums += torch.tensor([float(self._loss(kl, ce)) * kl.numel(), float(kl.sum()), kl.numel()],
                                 dtype=torch.float64, device=device)  # fmt: skip
        model.train(was_training)
        objective, kl, n = reduce(sums).tolist()
        student = evaluate(model, batches, self.token_bytes, device, autocast, reduce)
        if len(batches) not in self._teacher_eval:
            got = evaluate(self.teacher, batches, self.token_bytes, device, autocast, reduce)
            self._teacher_eval[len(batches)] = {"val_teacher_loss": got["val_loss"], "val_teacher_bpb": got["val_bpb"]}
        return {"val_loss": objective / n, "val_kl": kl / n, "val_ce": student["val_loss"],
                "val_bpb": student["val_bpb"]} | self._teacher_eval[len(batches)]  # fmt: skip
