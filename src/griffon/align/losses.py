"""Offline alignment losses on sequence log-probabilities: DPO and QRPO.

Both compare the policy's log-probability of a completion, ``log pi(y|x)`` summed over the
completion's tokens, with the reference policy's ``log pi_ref(y|x)`` (the model the alignment
starts from, computed once before training). Their difference times ``beta`` is the implicit
reward of Rafailov et al. 2023.

* **DPO** (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) on preference pairs: ``-log sigmoid(beta
  (log pi/pi_ref (y_w) - log pi/pi_ref (y_l)))``.
* **QRPO** (Matrenok, Moalla and Gulcehre 2025, arXiv 2507.08068) on pointwise rewards: the
  reward is replaced by its quantile ``q`` among rewards of the reference policy's completions for
  the same prompt, whose distribution under ``pi_ref`` is uniform on [0, 1]; so the KL-regularised
  optimum ``pi* = pi_ref exp(q / beta) / Z`` has a partition function known in closed form,
  ``Z = E[exp(q / beta)] = beta (exp(1 / beta) - 1)``, and the loss regresses ``beta log(pi/pi_ref)``
  onto ``q - beta log Z``, a squared error with no pairs and no sampled estimate of ``Z``.
  griffon uses this exact ``log Z = log beta + log(exp(1/beta) - 1)``; the paper's reference loss
  (its Eq. 11) drops the ``- 1``, ``log Z = log beta + 1/beta``, which is close only for small
  ``beta`` (the two differ by ``log(1 - exp(-1/beta))``: -0.0000454 at beta 0.1, -0.46 at beta 1),
  and the exact form keeps the regression's optimum a normalised policy at every ``beta``.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def quantile_reward(reward: float, ref_rewards: list[float] | torch.Tensor) -> float:
    """The fraction of the reference rewards at or below ``reward``: its quantile under ``pi_ref``."""
    ref = torch.as_tensor(ref_rewards, dtype=torch.float64)
    if ref.numel() < 2:
        raise ValueError(f"a quantile reward needs at least 2 reference rewards, got {ref.numel()}")
    return float((ref <= reward).double().mean())


def qrpo_log_partition(beta: float) -> float:
    """``log Z`` of the quantile reward: ``log(beta (exp(1/beta) - 1))``, computed without overflow
    as ``log beta + 1/beta + log1p(-exp(-1/beta))``."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return math.log(beta) + 1 / beta + math.log1p(-math.exp(-1 / beta))


def qrpo_loss(
    logps: torch.Tensor, ref_logps: torch.Tensor, quantiles: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """QRPO's loss, the mean over completions of ``(beta log(pi/pi_ref) - (q - beta log Z))^2``.

    ``logps``, ``ref_logps``: (B,) sequence log-probabilities of each completion under the policy
    and the reference; ``quantiles``: (B,) their quantile rewards. Returns the loss and, to log,
    the implicit rewards ``beta log(pi/pi_ref)`` and the regression targets."""
    implicit = beta * (logps - ref_logps)  # (B,)
    target = quantiles - beta * qrpo_log_partition(beta)  # (B,)
    loss = ((implicit - target) ** 2).mean()
    return loss, {"rewards": implicit.detach(), "targets": target.detach()}


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's loss, the mean over pairs of ``-log sigmoid(beta (log pi/pi_ref (y_w) - log pi/pi_ref (y_l)))``.

    Each argument is (B,) sequence log-probabilities. Returns the loss and, to log as TRL does,
    the chosen and rejected implicit rewards, their margins and whether the chosen one wins."""
    chosen = beta * (chosen_logps - ref_chosen_logps)  # (B,)
    rejected = beta * (rejected_logps - ref_rejected_logps)  # (B,)
    loss = -F.logsigmoid(chosen - rejected).mean()
    margins = (chosen - rejected).detach()
    return loss, {"chosen": chosen.detach(), "rejected": rejected.detach(), "margins": margins,
                  "accuracies": (margins > 0).float()}  # fmt: skip
