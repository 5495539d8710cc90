"""Preference losses as pure functions of sequence log-probabilities.

Each takes, per example, the summed log-probability of a response's tokens (response + EOS, the
tokens SFT trains on, as the one render function marks them) under the policy and, where the loss
needs one, under the frozen reference; and the number of those tokens when the loss averages.
They return the loss averaged over the batch and the per-example rewards the eval reports. No model
code here: the tests check every loss against values computed by hand.

- DPO (Rafailov et al. 2023): -log σ(β·[(πc - ρc) - (πr - ρr)]), optionally label-smoothed (cDPO).
- SimPO (Meng et al. 2024): no reference; length-normalised log-probs and a target margin γ:
  -log σ(β·(πc/|c| - πr/|r|) - γ).
- ORPO (Hong et al. 2024): no reference; the chosen response's mean NLL plus λ times
  -log σ(log odds(c) - log odds(r)), odds(y) = p/(1 - p) with p the mean per-token probability.
- KTO (Ethayarajh et al. 2024): unpaired, a label per example; the reward r = π - ρ against a
  reference point z0 (the policy-reference KL, estimated by the caller and detached):
  desirable w_d·(1 - σ(β(r - z0))), undesirable w_u·(1 - σ(β(z0 - r))).
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("dpo", "simpo", "orpo", "kto")
NEEDS_REFERENCE = {"dpo": True, "simpo": False, "orpo": False, "kto": True}


@dataclass
class PairLoss:
    loss: object  # scalar tensor, mean over the batch
    chosen_reward: object  # [batch] tensors, detached: what the eval's reward accuracy compares
    rejected_reward: object


def dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
        label_smoothing: float = 0.0) -> PairLoss:
    import torch.nn.functional as F

    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    z = beta * (chosen - rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PairLoss(loss.mean(), (beta * chosen).detach(), (beta * rejected).detach())


def simpo(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta: float = 2.0,
          gamma: float = 0.5) -> PairLoss:
    import torch.nn.functional as F

    chosen = beta * policy_chosen / chosen_tokens
    rejected = beta * policy_rejected / rejected_tokens
    loss = -F.logsigmoid(chosen - rejected - gamma)
    return PairLoss(loss.mean(), chosen.detach(), rejected.detach())


def orpo(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, lam: float = 0.1) -> PairLoss:
    import torch
    import torch.nn.functional as F

    mean_c = policy_chosen / chosen_tokens
    mean_r = policy_rejected / rejected_tokens

    def log_odds(m):  # log(p / (1 - p)) with log p = m < 0; log1p(-exp(m)) keeps p near 1 finite
        return m - torch.log1p(-torch.exp(m).clamp(max=1 - 1e-7))

    ratio = log_odds(mean_c) - log_odds(mean_r)
    loss = -mean_c - lam * F.logsigmoid(ratio)
    return PairLoss(loss.mean(), (lam * mean_c).detach(), (lam * mean_r).detach())


def kto(policy, reference, desirable, kl, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> PairLoss:
    """`desirable`: a bool tensor per example; `kl`: the reference point, clamped at 0 and detached
    here. Returns the rewards of desirable examples as chosen, of the others as rejected."""
    import torch

    z0 = kl.detach().clamp(min=0)
    reward = policy - reference
    good = desirable_weight * (1 - torch.sigmoid(beta * (reward - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - reward)))
    loss = torch.where(desirable, good, bad)
    r = (beta * reward).detach()
    return PairLoss(loss.mean(), r[desirable], r[~desirable])


def reward_accuracy(chosen_reward, rejected_reward) -> float:
    """Share of pairs whose chosen response earns the larger reward."""
    return float((chosen_reward > rejected_reward).float().mean())
