"""DPO (Rafailov et al. 2023, arXiv 2305.18290): ``objective=dpo`` on preference pairs.

Each example is ``{"prompt", "chosen", "rejected"}``; the loss (Eq. 7) is ``-log sigmoid(beta
(log pi/pi_ref (y_w) - log pi/pi_ref (y_l)))`` on the sequences' log-probabilities under the policy
and the reference policy, the model the run starts from (:mod:`griffon.align.preference`).
``beta log pi/pi_ref`` is the implicit reward.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from griffon.align.preference import PreferenceObjective
from griffon.data.sources import DataError


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


class DPO(PreferenceObjective):
    """DPO's examples and loss; logged: the chosen and rejected implicit rewards, their margins
    and whether the chosen one wins (as TRL does)."""

    name = "dpo"
    completions = ("chosen", "rejected")

    @classmethod
    def check_example(cls, where: str, ex: dict) -> None:
        if ex["chosen"] == ex["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same text (a pair that teaches nothing)")

    @classmethod
    def example_need(cls, rows: list[list[int]], firsts: list[int | None]) -> int | None:
        """A pair teaches once both rows have a target and they differ."""
        chosen, rejected = rows
        differ = next((j for j, (x, y) in enumerate(zip(chosen, rejected, strict=False)) if x != y),
                      min(len(chosen), len(rejected)))  # fmt: skip
        need = super().example_need(rows, firsts)
        return None if need is None else max(need, differ)

    def batch_loss(self, logps, ref, values):
        loss, logs = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], self.beta)
        return loss, {k: v.mean() for k, v in logs.items()}
