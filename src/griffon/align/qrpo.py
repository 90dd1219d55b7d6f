"""QRPO (Matrenok, Moalla and Gulcehre 2025, arXiv 2507.08068): ``objective=qrpo`` on pointwise rewards.

Each example is ``{"prompt", "completion", "reward", "ref_rewards": [...]}``, ``ref_rewards`` the
rewards of the reference policy's completions for the same prompt (``griffon rewards`` writes
them). The reward is replaced by its quantile ``q`` among them, whose distribution under
``pi_ref`` is uniform on [0, 1]; so the KL-regularised optimum ``pi* = pi_ref exp(q / beta) / Z``
has a partition function known in closed form, ``Z = E[exp(q / beta)] = beta (exp(1 / beta) - 1)``,
and the loss regresses ``beta log(pi/pi_ref)`` (the implicit reward of Rafailov et al. 2023)
onto ``q - beta log Z``, a squared error with no pairs and no sampled estimate of ``Z``.
griffon uses this exact ``log Z = log beta + log(exp(1/beta) - 1)``; the paper's reference loss
(its Eq. 11) drops the ``- 1``, ``log Z = log beta + 1/beta``, which is close only for small
``beta`` (the two differ by ``log(1 - exp(-1/beta))``: -0.0000454 at beta 0.1, -0.46 at beta 1),
and the exact form keeps the regression's optimum a normalised policy at every ``beta``.
"""

from __future__ import annotations

import math

import torch

from griffon.align.preference import PreferenceObjective, real_value
from griffon.data.sources import DataError


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


class QRPO(PreferenceObjective):
    """QRPO's examples and loss; logged: the implicit rewards, the quantiles and the raw rewards
    of the batch."""

    name = "qrpo"
    completions = ("completion",)

    @classmethod
    def check_example(cls, where: str, ex: dict) -> None:
        reward, refs = ex.get("reward"), ex.get("ref_rewards")
        if real_value(reward) is None:
            raise DataError(f"{where}: 'reward' must be a finite number, got {reward!r}")
        if not isinstance(refs, list) or len(refs) < 2 or any(real_value(r) is None for r in refs):
            raise DataError(f"{where}: 'ref_rewards' must be a list of 2 or more finite numbers")

    @classmethod
    def example_values(cls, ex: dict) -> dict[str, float]:
        return {"quantile": quantile_reward(ex["reward"], ex["ref_rewards"]), "reward": real_value(ex["reward"])}

    def batch_loss(self, logps, ref, values):
        q = values["quantile"].to(logps.dtype)
        loss, logs = qrpo_loss(logps, ref, q, self.beta)
        return loss, {"implicit_reward": logs["rewards"].mean(), "quantile": q.mean(),
                      "reward": values["reward"].mean()}  # fmt: skip
