"""Masked tensor math shared by the online-RL losses (PPO, GRPO, online DPO): masked statistics, whitening,
generalised advantage estimation, the policy-gradient advantage estimators (GRPO's group-relative, RLOO's
leave-one-out, REINFORCE++'s batch-normalised returns), online DPO's best/worst pairs and per-token KL estimators.

Shape legend: B sequences, N completion tokens. Masks are 1 on real completion tokens (EOS included) and 0 on
padding; every completion's real tokens come first (right padding), as ``Rollout.completion_mask`` produces.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")
SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


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


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """(prompts, G) detached fp32 view of (B,) rewards whose groups are adjacent."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.detach().float().view(-1, group_size)


def equal_reward_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(prompts,) bool: True where a group's G rewards are all equal, so every group-relative advantage is 0 (DAPO's
    dynamic sampling drops these groups). Exact equality: robust to rounding in a std."""
    grouped = _grouped(rewards, group_size)
    return (grouped == grouped[:, :1]).all(-1)


def best_worst_pairs(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Online DPO's preference pairs: from (prompts·G,) rewards of G adjacent completions per prompt, the flat row
    index of each group's highest-rewarded (chosen) and lowest-rewarded (rejected) completion, the first of equals,
    and a (prompts,) bool of the decisive groups, those whose rewards are not all equal (a tie is no preference).

    Returns:
        chosen (prompts,) int64, rejected (prompts,) int64 and decisive (prompts,) bool.
    """
    grouped = _grouped(rewards, group_size)  # (prompts, G)
    offsets = torch.arange(grouped.size(0), device=rewards.device) * group_size
    return grouped.argmax(-1) + offsets, grouped.argmin(-1) + offsets, ~equal_reward_groups(rewards, group_size)


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
    grouped = _grouped(rewards, group_size)  # (prompts, G)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # unbiased, as TRL
    zero_std = equal_reward_groups(rewards, group_size)[:, None]
    advantages = grouped - mean
    if scale_rewards == "group":
        advantages = advantages / (std + eps)
    elif scale_rewards == "batch":
        batch_std = grouped.std() if grouped.numel() > 1 else grouped.new_zeros(())
        advantages = advantages / (batch_std + eps)
    advantages = advantages.masked_fill(zero_std, 0.0)
    return advantages.view(-1), GroupAdvantageStats(std.view(-1), zero_std.float().mean())


def rloo_advantages(rewards: Tensor, group_size: int) -> tuple[Tensor, GroupAdvantageStats]:
    """RLOO's leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 6): each completion's reward
    minus the mean reward of the other G − 1 completions of its prompt,
    ``A_i = r_i − 1/(G−1) Σ_{j≠i} r_j = G/(G−1) · (r_i − mean_j r_j)``; unscaled.

    Args:
        rewards: (B,) rewards, the ``group_size`` completions of one prompt adjacent.
        group_size: G ≥ 2.

    Returns:
        advantages (B,) fp32 (exactly 0 in a group whose rewards are all equal) and stats as for
        :func:`group_advantages`.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    grouped = _grouped(rewards, group_size)  # (prompts, G)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # (prompts, G)
    zero_std = equal_reward_groups(rewards, group_size)
    advantages = (grouped - baseline).masked_fill(zero_std[:, None], 0.0)
    return advantages.view(-1), GroupAdvantageStats(grouped.std(-1), zero_std.float().mean())


def reinforce_pp_advantages(scores: Tensor, mask: Tensor, kl: Optional[Tensor] = None, kl_coef: float = 0.0,
                            gamma: float = 1.0) -> Tensor:
    """REINFORCE++ advantages (Hu et al. 2025; OpenRLHF's ``advantage_estimator=reinforce``): no critic and no
    group baseline; the KL to the reference is a per-token penalty in the reward, and the returns are normalised
    over the whole batch.

    Per-token reward ``r_t = −β·KL_t + 1[t = last] · score``, return ``G_t = Σ_{s≥t} γ^{s−t} r_s`` (GAE with V = 0
    and λ = 1), advantage = ``G_t`` whitened over every real token of the batch.

    Args:
        scores: (B,) sequence rewards.
        mask: (B, N) completion mask.
        kl: (B, N) per-token KL estimate of the sampling policy to the reference (e.g. ``kl_estimate(..., "k1")``);
            None: no penalty.
        kl_coef: β.
        gamma: discount γ.

    Returns:
        (B, N) fp32 detached advantages, 0 where masked.
    """
    mask = mask.float()
    rewards = torch.zeros_like(mask)
    if kl is not None:
        rewards = rewards - kl_coef * kl.detach().float() * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) the last real token (right padding)
    rewards[torch.arange(mask.size(0)), last] += scores.detach().float() * (mask.sum(-1) > 0)
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    return masked_whiten(returns, mask)


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
