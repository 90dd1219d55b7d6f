"""Self-guided training of structured FFNs (Wei et al. 2024, arXiv 2406.16450, section 4).

Early in training, each structured layer S gets a dense guide W and computes
``a W x + (1 - a) S x`` (plus its bias); ``a`` falls from 1 to 0 along a cosine over the guided
steps, then the guides are deleted, so the saved model holds only the structured factors. The
guide starts as S's exact dense equivalent, shuffle permutations included (the published code
leaves BlockShuffle's permutations out, so its guide starts as a different function).

The guides hang off the layers by forward hooks: the model definition knows nothing about them.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn
from torch.nn import functional as F

from griffon.nn.structured import StructuredLinear
from griffon.train.config import SelfGuidedConfig


def guide_coefficient(step: int, guide_steps: int) -> float:
    """Weight of the dense guide at optimizer step ``step`` (0-based): ``0.5 (1 + cos(pi t / T))``
    for ``t < T``, then 0."""
    if step >= guide_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / guide_steps))


def dense_branch_runs(step: int, guide_steps: int, reduce_flop: bool, seed: int) -> bool:
    """Whether the guide is computed at ``step``. With ``reduce_flop`` it runs with probability
    equal to its coefficient, drawn once per optimizer step from ``(seed, step)`` so that a resumed
    run makes the same draws (and its FLOPs are known in advance)."""
    a = guide_coefficient(step, guide_steps)
    if a == 0.0:
        return False
    if not reduce_flop:
        return True
    return random.Random(seed * 1_000_003 + step).random() < a


class SelfGuidance:
    """Dense guides for every structured layer of ``model``.

    The guides live here, not in the model: ``model.state_dict()`` never holds them, so every
    checkpoint's model file is the plain structured model; the trainer keeps the guides (and their
    optimizer state) in the checkpoint's training state while the guided phase lasts.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, m in model.named_modules() if isinstance(m, StructuredLinear)]
        layers = [model.get_submodule(n) for n in self.names]
        if not layers:
            raise ValueError("self-guided training needs a structured FFN (model.ffn_structure.kind)")
        self.guides = [nn.Parameter(layer.to_dense().detach().clone()) for layer in layers]  # (out, in) each
        self.coefficient = 1.0
        self.active = True
        self._hooks = [
            layer.register_forward_hook(lambda m, inputs, out, g=guide: self._mix(m, inputs[0], out, g))
            for layer, guide in zip(layers, self.guides, strict=True)
        ]

    def _mix(self, layer: nn.Module, x: torch.Tensor, output: torch.Tensor, guide: nn.Parameter) -> torch.Tensor:
        if not self.active:
            return output
        a = self.coefficient
        return a * F.linear(x, guide, layer.bias) + (1.0 - a) * output

    def parameters(self) -> list[nn.Parameter]:
        return list(self.guides)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: g.detach() for name, g in zip(self.names, self.guides, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            raise ValueError("the checkpoint's self-guided state does not match this model's structured layers")
        with torch.no_grad():
            for name, g in zip(self.names, self.guides, strict=True):
                g.copy_(state[name])

    def set_step(self, step: int, guide_steps: int, reduce_flop: bool, seed: int) -> bool:
        """Set the coefficient for ``step``; return whether the dense branch runs."""
        self.coefficient = guide_coefficient(step, guide_steps)
        self.active = dense_branch_runs(step, guide_steps, reduce_flop, seed)
        return self.active

    def add_to(self, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        """Give the guides their own (last) parameter group, so :meth:`remove` can drop it whole."""
        optimizer.add_param_group({"params": self.guides, "weight_decay": weight_decay})

    def remove(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Detach the guides from the model and delete them and their optimizer state."""
        if optimizer is not None:
            ids = {id(g) for g in self.guides}
            optimizer.param_groups[:] = [
                group for group in optimizer.param_groups if not any(id(p) in ids for p in group["params"])
            ]
            for g in self.guides:
                optimizer.state.pop(g, None)
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.guides, self.names = [], [], []


class GuidedPhase:
    """Self-guided training as the training loop sees it: hooks it calls around each optimizer step.

    :meth:`before_step` sets the guides' coefficient and returns the step's extra FLOPs per token;
    :meth:`after_step` ends the phase after ``guide_steps`` steps (the guides leave model and
    optimizer); :meth:`parameters` are the guides, reduced across ranks and clipped with the
    model's; :meth:`state` joins the checkpoint's training state and :meth:`resume` restores it;
    :meth:`log_fields` adds the coefficient to the log. With self-guided training off, or once the
    phase is over, the hooks do nothing.
    """

    def __init__(self, model: nn.Module, cfg: SelfGuidedConfig, seed: int, guide_steps: int, flops_per_token: float):
        self.cfg, self.seed, self.guide_steps, self.flops_per_token = cfg, seed, guide_steps, flops_per_token
        self.guidance = SelfGuidance(model) if cfg.enabled else None

    def resume(self, step: int, training_state: dict) -> None:
        if self.guidance is None:
            return
        if step >= self.guide_steps:
            self._end(None)
        else:
            self.guidance.load_state_dict(training_state["self_guided"])

    def add_to(self, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        if self.guidance is not None:
            self.guidance.add_to(optimizer, weight_decay)

    def before_step(self, step: int) -> float:
        """Set up optimizer step ``step`` (0-based); return its extra training FLOPs per token."""
        if self.guidance is None:
            return 0.0
        runs = self.guidance.set_step(step, self.guide_steps, self.cfg.reduce_flop, self.seed)
        return self.flops_per_token if runs else 0.0

    def after_step(self, steps_done: int, optimizer: torch.optim.Optimizer) -> None:
        if self.guidance is not None and steps_done >= self.guide_steps:
            self._end(optimizer)  # no guide survives in model or optimizer

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.guidance is None else self.guidance.parameters()

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {} if self.guidance is None else {"self_guided": self.guidance.state_dict()}

    def log_fields(self) -> dict[str, float]:
        if not self.cfg.enabled:
            return {}
        return {"guide": 0.0 if self.guidance is None else self.guidance.coefficient}

    def _end(self, optimizer: torch.optim.Optimizer | None) -> None:
        assert self.guidance is not None
        self.guidance.remove(optimizer)
        self.guidance = None


def plan_guided_run(
    guide_fraction: float,
    mode: str,
    reduce_flop: bool,
    seed: int,
    planned_steps: int,
    step_flops: float,
    guide_step_flops: float,
    dense_step_flops: float,
    flop_budget: float | None,
) -> tuple[int, int]:
    """Return ``(total_steps, guide_steps)``.

    ``fixed_steps``: the run keeps its ``planned_steps`` and guides ``guide_fraction`` of them.
    ``fixed_flops``: the budget is what the dense-FFN model would spend (``flop_budget``, or
    ``planned_steps`` dense steps); the guided steps are ``guide_fraction`` of the dense run's
    steps, and the run is lengthened with unguided steps until it has spent the same FLOPs.
    ``*_step_flops`` are training FLOPs of one optimizer step: structured model, guide alone, dense model.
    """
    if mode == "fixed_steps":
        return planned_steps, max(1, math.ceil(guide_fraction * planned_steps))
    budget = flop_budget if flop_budget is not None else planned_steps * dense_step_flops
    dense_steps = budget / dense_step_flops
    guide_steps = max(1, round(guide_fraction * dense_steps))
    spent = sum(
        step_flops + (guide_step_flops if dense_branch_runs(t, guide_steps, reduce_flop, seed) else 0.0)
        for t in range(guide_steps)
    )
    rest = max(0, round((budget - spent) / step_flops))
    return guide_steps + rest, guide_steps
