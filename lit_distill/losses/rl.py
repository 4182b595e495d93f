"""Masked tensor math shared by the online-RL losses (PPO and GRPO): masked statistics, whitening, generalised
advantage estimation, group-relative advantages and per-token KL estimators.

Shape legend: B sequences, N completion tokens. Masks are 1 on real completion tokens (EOS included) and 0 on
padding; every completion's real tokens come first (right padding), as ``Rollout.completion_mask`` produces.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")
SCALE_REWARDS = ("group", "batch", "none")


def masked_sum(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1 (over ``dim``, or everything)."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 (still attached to the graph) where nothing is unmasked."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the unmasked entries (Bessel-corrected when ``unbiased`` and more than one entry)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the unmasked entries to unit variance (and zero mean when ``shift_mean``); masked entries → 0.

    PPO whitens advantages over the whole rollout batch; keeping the mean (``shift_mean=False``) is the usual
    choice for rewards, whose sign matters.
    """
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each completion.

    The state before completion token t has value ``values[:, t]``; the episode ends after the last real token,
    so the value beyond it is 0 (a truncated completion is treated as terminal too: its missing future is
    accounted for by the score and the optional missing-EOS penalty, as in TRL / OpenRLHF).

    Args:
        rewards: (B, N) per-token rewards (e.g. −β·KL everywhere plus the score on the last real token).
        values: (B, N) value estimates.
        mask: (B, N) completion mask.
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        advantages (B, N) and returns = advantages + values (B, N), both 0 where masked and detached.
    """
    rewards, values, mask = rewards.detach().float(), values.detach().float(), mask.float()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # Padding after the end contributes nothing: its value and advantage are not carried backwards.
        advantages[:, t] = advantage * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


class GroupAdvantageStats(NamedTuple):
    """Detached diagnostics of ``group_advantages``.

    Attributes:
        reward_std: (G_count,) per-group standard deviation of the rewards.
        frac_zero_std: scalar fraction of groups whose rewards are all equal (they give no learning signal).
    """

    reward_std: Tensor
    frac_zero_std: Tensor


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> tuple[Tensor, GroupAdvantageStats]:
    """GRPO's group-relative advantages: each completion's reward minus its group's mean, optionally scaled.

    Args:
        rewards: (B,) rewards, the ``group_size`` completions of one prompt adjacent (B = prompts × group_size).
        group_size: G, completions per prompt.
        scale_rewards: ``"group"`` divides by the group's std (GRPO, DeepSeekMath), ``"batch"`` by the std of
            all rewards of the batch (more robust for small groups), ``"none"`` does not scale (Dr. GRPO: scaling
            by the group std over-weights near-deterministic prompts).
        eps: floor added to the std.

    Returns:
        advantages (B,) fp32 and stats. A group whose rewards are all equal has advantage exactly 0 whatever the
        scaling (no 0/0, no rounding noise amplified by 1/eps).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.detach().float().view(-1, group_size)  # (prompts, G)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # unbiased, as TRL
    zero_std = (grouped == grouped[:, :1]).all(-1, keepdim=True)  # exact equality: robust to rounding in std
    advantages = grouped - mean
    if scale_rewards == "group":
        advantages = advantages / (std + eps)
    elif scale_rewards == "batch":
        batch_std = grouped.std() if grouped.numel() > 1 else grouped.new_zeros(())
        advantages = advantages / (batch_std + eps)
    advantages = advantages.masked_fill(zero_std, 0.0)
    return advantages.view(-1), GroupAdvantageStats(std.view(-1), zero_std.float().mean())


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of tokens sampled from π (Schulman, "Approximating
    KL divergence", 2020).

    With log r = log π_ref(y) − log π(y):

    * ``k1``: −log r. Unbiased, high variance, can be negative per token.
    * ``k2``: ½ (log r)². Biased, low variance, ≥ 0.
    * ``k3``: r − 1 − log r. Unbiased, low variance, ≥ 0 (GRPO's choice).

    Args:
        logprobs: (B, N) log π of the sampled tokens.
        ref_logprobs: (B, N) log π_ref of the same tokens.
        estimator: one of :data:`KL_ESTIMATORS`.

    Returns:
        (B, N) per-token estimates (callers mask them).
    """
    log_ratio = ref_logprobs.float() - logprobs.float()
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        # expm1 keeps r - 1 accurate when the policies are close.
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
