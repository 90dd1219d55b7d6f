"""The alignment losses against their formulas, and QRPO's optimum reached on a tiny policy."""

import math

import pytest
import torch

from griffon.align.dpo import dpo_loss
from griffon.align.qrpo import qrpo_log_partition, qrpo_loss, quantile_reward


def test_quantile_reward_is_the_share_of_reference_rewards_at_or_below():
    assert quantile_reward(2.0, [1.0, 2.0, 3.0, 4.0]) == 0.5
    assert quantile_reward(0.0, [1.0, 2.0]) == 0.0 and quantile_reward(9.0, [1.0, 2.0]) == 1.0
    with pytest.raises(ValueError, match="at least 2 reference rewards"):
        quantile_reward(1.0, [1.0])


@pytest.mark.parametrize("beta", [0.05, 0.3, 1.0, 4.0])
def test_the_partition_function_is_the_mean_of_exp_q_over_beta_for_uniform_q(beta):
    q = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    numeric = torch.trapezoid(torch.exp(q / beta), q).log().item()
    assert qrpo_log_partition(beta) == pytest.approx(numeric, rel=1e-9)


def test_training_a_categorical_policy_with_qrpo_reaches_the_kl_regularised_optimum():
    """Five completions of one prompt with quantile rewards q and a reference policy under which
    E[exp(q / beta)] is the closed-form Z (as when q is uniform under pi_ref): the regression's
    optimum beta log(pi/pi_ref) = q - beta log Z is a normalised policy, pi_ref exp(q/beta) / Z,
    and training the policy's logits on the QRPO loss reaches it."""
    beta = 0.5
    q = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    z = math.exp(qrpo_log_partition(beta))
    e = torch.exp(q / beta)
    # pi_ref = uniform + t (last - first): the t that makes sum(pi_ref e) = Z
    d = torch.tensor([-1.0, 0, 0, 0, 1.0], dtype=torch.float64)
    t = (z - e.mean()) / (d * e).sum()
    pi_ref = torch.full((5,), 0.2, dtype=torch.float64) + t * d
    assert (pi_ref > 0).all() and (pi_ref * e).sum().item() == pytest.approx(z)
    optimum = pi_ref * e / z
    assert optimum.sum().item() == pytest.approx(1.0)

    logits = pi_ref.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(3000):
        loss, _ = qrpo_loss(torch.log_softmax(logits, 0), pi_ref.log(), q, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-12
    assert torch.allclose(torch.softmax(logits, 0), optimum, atol=1e-6)


def test_dpo_loss_and_gradient_match_the_formula():
    torch.manual_seed(0)
    beta = 0.1
    chosen, rejected = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    ref_chosen, ref_rejected = torch.randn(6), torch.randn(6)
    loss, logs = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    want = sum(-math.log(1 / (1 + math.exp(-m))) for m in margin.tolist()) / 6
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # d/d chosen_i of mean(-log sigmoid(m)) = -beta sigmoid(-m_i) / B; the rejected get the opposite
    expected = -beta * torch.sigmoid(-margin.detach()) / 6
    assert torch.allclose(chosen.grad, expected, atol=1e-7) and torch.allclose(rejected.grad, -expected, atol=1e-7)
    assert torch.equal(logs["accuracies"], (margin > 0).float().detach())


def test_the_arithmetic_reward_is_exact_and_graded():
    from griffon.align import arithmetic

    assert arithmetic.reward("12+30=", "42") == 1.0 and arithmetic.reward("12+30=", " 45\n") == pytest.approx(0.7)
    assert arithmetic.reward("12+30=", "99") == 0.0 and arithmetic.reward("12+30=", "4x") == 0.0
    with pytest.raises(ValueError, match="not an addition prompt"):
        arithmetic.reward("hello", "42")
    pairs = arithmetic.make_prompts(50, seed=0)
    assert pairs == arithmetic.make_prompts(50, seed=0) and all(10 <= a < 100 and 10 <= b < 100 for a, b in pairs)
    assert arithmetic.sft_example(12, 30) == {"prompt": "12+30=", "completion": "42\n"}
