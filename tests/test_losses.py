"""Each preference loss against values worked out by hand (scalar math, no torch in the reference)."""

from __future__ import annotations

import math

import pytest
import torch

from habit import losses


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x: float) -> float:  # -log σ(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def test_dpo_by_hand():
    # policy is 1 nat above the reference on chosen, 1 below on rejected: z = 0.1 * 2
    out = losses.dpo(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert float(out.loss) == pytest.approx(0.598138869, abs=1e-8)  # log(1 + e^-0.2)
    assert float(out.chosen_reward) == pytest.approx(0.1)
    assert float(out.rejected_reward) == pytest.approx(-0.1)
    smooth = losses.dpo(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, label_smoothing=0.1)
    assert float(smooth.loss) == pytest.approx(0.9 * 0.598138869 + 0.1 * 0.798138869, abs=1e-8)


def test_dpo_is_zero_margin_at_the_reference():
    out = losses.dpo(t(-3.0, -7.0), t(-5.0, -2.0), t(-3.0, -7.0), t(-5.0, -2.0))
    assert float(out.loss) == pytest.approx(math.log(2))  # σ(0) = 1/2 for every pair


def test_simpo_by_hand():
    # mean log-probs -2 and -3, β 2 → rewards -4 and -6, margin 2 - γ 0.5
    out = losses.simpo(t(-20.0), t(-30.0), t(10.0), t(10.0), beta=2.0, gamma=0.5)
    assert float(out.loss) == pytest.approx(0.20141327798, abs=1e-9)
    assert float(out.chosen_reward) == pytest.approx(-4.0)
    assert float(out.rejected_reward) == pytest.approx(-6.0)


def test_simpo_normalises_by_length():
    short = losses.simpo(t(-10.0), t(-10.0), t(5.0), t(10.0))
    assert float(short.chosen_reward) < float(short.rejected_reward)  # same sum, fewer tokens: worse


def test_orpo_by_hand():
    def log_odds(m):
        return m - math.log(1 - math.exp(m))

    ratio = log_odds(-0.5) - log_odds(-1.0)
    expected = 0.5 + 0.1 * softplus(ratio)
    out = losses.orpo(t(-5.0), t(-10.0), t(10.0), t(10.0), lam=0.1)
    assert float(out.loss) == pytest.approx(expected, abs=1e-9)
    assert ratio == pytest.approx(0.97407697, abs=1e-7)


def test_orpo_stays_finite_when_the_chosen_answer_is_certain():
    out = losses.orpo(t(-1e-9), t(-3.0), t(4.0), t(4.0))
    assert math.isfinite(float(out.loss))


def test_kto_by_hand():
    out = losses.kto(t(-10.0, -10.0), t(-11.0, -9.0), torch.tensor([True, False]), t(0.5), beta=0.1)
    good = 1 - 1 / (1 + math.exp(-0.05))  # reward 1 against z0 0.5
    bad = 1 - 1 / (1 + math.exp(-0.15))  # reward -1: z0 - r = 1.5
    assert float(out.loss) == pytest.approx((good + bad) / 2, abs=1e-9)
    assert out.chosen_reward.tolist() == pytest.approx([0.1])
    assert out.rejected_reward.tolist() == pytest.approx([-0.1])


def test_kto_reference_point_is_clamped_and_detached():
    kl = torch.tensor(-3.0, requires_grad=True)
    policy = t(-1.0).requires_grad_(True)
    out = losses.kto(policy, t(-1.0), torch.tensor([True]), kl)
    assert float(out.loss.detach()) == pytest.approx(0.5)  # z0 = max(0, -3) = 0, reward 0: 1 - σ(0)
    out.loss.backward()
    assert kl.grad is None and policy.grad is not None


def test_losses_fall_as_the_policy_prefers_chosen():
    for method in ("dpo", "simpo", "orpo"):
        values = []
        for gap in (0.0, 2.0, 4.0):
            c, r = t(-10.0 + gap), t(-10.0 - gap)
            if method == "dpo":
                out = losses.dpo(c, r, t(-10.0), t(-10.0))
            elif method == "simpo":
                out = losses.simpo(c, r, t(10.0), t(10.0))
            else:
                out = losses.orpo(c, r, t(10.0), t(10.0))
            values.append(float(out.loss))
        assert values[0] > values[1] > values[2], (method, values)


def test_reward_accuracy():
    assert losses.reward_accuracy(t(1.0, 2.0, 0.0, 5.0), t(0.0, 3.0, -1.0, 5.0)) == 0.5
