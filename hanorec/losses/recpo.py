"""RecPO pieces (R²ec, arXiv 2505.16994): fused rewards, group advantages, clipped surrogate.

:func:`recpo_rewards` (NDCG@k + softmax-probability reward per trace), :func:`group_advantages`
(GRPO Gaussian or RLOO leave-one-out) and :func:`clipped_surrogate` (PPO clip with DAPO's
asymmetric range, token-level mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hanorec.losses._checks import _check, _check_items, _shape

#: Group-advantage estimators of :func:`group_advantages`.
ADVANTAGES: tuple[str, ...] = ("gaussian", "leave_one_out")


@torch.no_grad()
def recpo_rewards(
    scores: Tensor, targets: Tensor, *, ndcg_k: int = 1000, softmax_weight: float = 0.05
) -> Tensor:
    """Fused RecPO reward (R²ec §RecPO): ``R = (1−w)·NDCG@k(rank) + w·softmax(s)[target]``.

    ``rank = 1 + #{v ≠ target : s(v) ≥ s(target)}`` (ties pessimistic); with one relevant item
    ``NDCG@k = 1/log2(rank + 1)`` if ``rank ≤ k`` else 0.

    Args:
        scores: ``[B, G, N]`` item scores of G traces per user.
        targets: ``[B]`` target item indices.
        ndcg_k: NDCG cut-off k.
        softmax_weight: w in [0, 1].

    Returns:
        ``[B, G]`` rewards (no gradient).
    """
    where = "recpo_rewards"
    _check(scores.dim() == 3, where, f"scores must be [B, G, N], got {_shape(scores)}")
    ok = tuple(targets.shape) == (scores.shape[0],)
    _check(ok, where, f"targets must be [{scores.shape[0]}], got {_shape(targets)}")
    _check_items(where, "targets", targets, scores.shape[2])
    _check(ndcg_k >= 1, where, f"ndcg_k must be >= 1, got {ndcg_k}")
    _check(
        0 <= softmax_weight <= 1, where, f"softmax_weight must be in [0, 1], got {softmax_weight}"
    )
    index = targets.to(scores.device)[:, None, None].expand(-1, scores.shape[1], 1)
    target_score = scores.gather(-1, index)  # [B, G, 1]
    rank = (scores >= target_score).sum(-1)  # counts the target itself: the "+1"
    ndcg = torch.where(rank <= ndcg_k, 1.0 / torch.log2(rank.to(scores.dtype) + 1), 0.0)
    prob = (target_score.squeeze(-1) - torch.logsumexp(scores, dim=-1)).exp()
    return (1 - softmax_weight) * ndcg + softmax_weight * prob


def group_advantages(rewards: Tensor, kind: str = "gaussian") -> Tensor:
    """Group-relative advantages over the G traces of each user (GRPO / RecPO).

    * ``gaussian``: ``A = (R − mean_g R) / (std_g R + 1e-8)`` with the unbiased (G−1) std, as
      GRPO and TRL do.
    * ``leave_one_out``: ``A_g = R_g − mean_{g'≠g} R_{g'}`` (RLOO).

    G = 1 gives zeros.

    Args:
        rewards: ``[B, G]``.
        kind: ``gaussian`` or ``leave_one_out``.

    Returns:
        ``[B, G]`` advantages.
    """
    where = "group_advantages"
    _check(rewards.dim() == 2, where, f"rewards must be [B, G], got {_shape(rewards)}")
    ok = kind in ADVANTAGES
    _check(ok, where, f"kind must be 'gaussian' or 'leave_one_out', got {kind!r}")
    group = rewards.shape[1]
    if group == 1:
        return torch.zeros_like(rewards)
    if kind == "gaussian":
        return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-8)
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (group - 1)


def clipped_surrogate(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> Tensor:
    """Token-level clipped policy surrogate (PPO clip with DAPO's asymmetric range).

    ``ρ = exp(log π − log π_old)``; per token ``−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)``,
    averaged over all unmasked tokens of the batch (token-level mean; 0 when none).

    Args:
        logps: ``[N, T]`` token log-probs under the current policy.
        old_logps: ``[N, T]`` token log-probs under the sampling policy (treated as constant).
        advantages: ``[N]`` (broadcast over tokens) or ``[N, T]``.
        mask: ``[N, T]`` bool or 0/1, 1 on response tokens.
        eps_low: lower clip ε_low (0.2).
        eps_high: upper clip ε_high (0.28).

    Returns:
        Scalar loss.
    """
    where = "clipped_surrogate"
    shapes = f"{_shape(logps)}, {_shape(old_logps)}, {_shape(mask)}"
    ok = logps.dim() == 2 and old_logps.shape == logps.shape == mask.shape
    _check(ok, where, f"logps, old_logps and mask must share one [N, T] shape, got {shapes}")
    if advantages.dim() == 1 and advantages.shape[0] == logps.shape[0]:
        advantages = advantages[:, None]
    ok = advantages.dim() == 2 and advantages.shape[0] == logps.shape[0]
    ok = ok and advantages.shape[1] in (1, logps.shape[1])
    _check(
        ok,
        where,
        f"advantages must be [{logps.shape[0]}] or {_shape(logps)}, got {_shape(advantages)}",
    )
    _check(0 <= eps_low < 1 and eps_high >= 0, where, f"bad clip range {eps_low}, {eps_high}")
    advantages = advantages.detach()
    ratio = torch.exp(logps - old_logps.detach())
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)
