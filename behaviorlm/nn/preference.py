"""The objectives of the later training stages, as plain functions of log-probabilities.

Pretraining teaches the model what people *do next*; a shop wants what they will *buy*. The
stages after it follow the LLM pipeline, on (context, item) log-probabilities the network
computes with :meth:`~behaviorlm.nn.model.BehaviorTransformer.item_logp_columns`:

* **DPO** (Rafailov et al., NeurIPS 2023): at a context, the item the user bought (``w``) is
  preferred over one they only looked at (``l``); with the frozen pretrained model as reference,
  ``-log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)])``. At the reference it is ``log 2``.
* **S-DPO** (Chen et al., NeurIPS 2024): the same with several rejected items at once, the
  softmax form ``-log sigmoid(-log sum_l exp(beta * [(pi_l - ref_l) - (pi_w - ref_w)]))``,
  which for one rejected item is DPO.
* **SFT**: cross-entropy on the bought item -- the control with the same contexts and steps.
* **GRPO** (Shao et al., 2024): rewards of K samples from the same context, standardised within
  their group (the group mean is the baseline, so no value network), and a KL penalty to the
  reference with the ``k3`` estimator, which is zero at the reference and never negative.

Nothing here knows about events or items; the stages in :mod:`behaviorlm.finetune` build the
contexts, pairs and rewards and call these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: ``log 2``: the DPO loss of any pair while the policy equals its reference
LOG2 = math.log(2.0)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean pairwise DPO loss. ``*_chosen``: (B,) log-probabilities of the preferred item;
    ``*_rejected``: (B, N), each paired with its row's chosen item; ``valid`` (B, N) marks the
    real pairs (rows hold different numbers of rejected items)."""
    margin = beta * ((policy_chosen - ref_chosen)[:, None] - (policy_rejected - ref_rejected))
    losses = -F.logsigmoid(margin)
    if valid is None:
        return losses.mean()
    return (losses * valid).sum() / valid.sum().clamp_min(1)


def sdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean S-DPO loss over contexts: all of a row's rejected items in one softmax term; rows
    without a valid rejected item contribute nothing."""
    gap = beta * ((policy_rejected - ref_rejected) - (policy_chosen - ref_chosen)[:, None])
    if valid is not None:
        gap = gap.masked_fill(~valid, float("-inf"))
    has_any = torch.isfinite(gap).any(1)
    losses = -F.logsigmoid(-torch.logsumexp(gap[has_any], 1))
    return losses.sum() / has_any.sum().clamp_min(1)


def sft_loss(policy_chosen: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the preferred item: the supervised control."""
    return -policy_chosen.mean()


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantage: each of a context's K rewards (B, K) minus the group mean, over the
    group standard deviation. A group whose rewards are all equal teaches nothing: zero."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True, unbiased=False)
    return torch.where(std > eps, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def kl_to_reference(policy_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-sample KL estimate of the policy from the reference at the policy's own samples
    (Schulman's ``k3``: ``exp(ref - pi) - (ref - pi) - 1``): unbiased, >= 0, and exactly 0
    where the policy equals the reference."""
    d = ref_logp - policy_logp
    return torch.exp(d) - d - 1.0


def plackett_luce_logp(item_logp: torch.Tensor) -> torch.Tensor:
    """Log-probability of drawing a slate in this order without replacement: (B, K, N) item
    log-probabilities -> (B, K), ``sum_j [log p_j - log(1 - sum_{m<j} p_m)]``."""
    p = item_logp.exp()
    taken = torch.cumsum(p, -1) - p  # probability mass drawn before each position
    return (item_logp - torch.log1p(-taken.clamp(max=1 - 1e-6))).sum(-1)
