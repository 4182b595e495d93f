"""Proximal policy optimisation losses on completion tokens (Schulman et al. 2017): the clipped surrogate policy
loss and the clipped value loss, shared by PPO and GRPO, and the adaptive KL controller of RLHF's PPO.

Shape legend: B sequences, N completion tokens. Both losses return the *token sum* of the per-token loss (the
caller divides by the token count of the whole optimizer step, across micro-batches and ranks) or its mean.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lit_distill.losses.rl import kl_estimate, masked_mean, masked_sum

REDUCTIONS = ("sum", "mean", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


class PolicyStats(NamedTuple):
    """Detached diagnostics of ``clipped_policy_loss`` (token means over the mask).

    Attributes:
        approx_kl: k3 estimate of KL(π_old ‖ π_new) from the probability ratios (cleanrl's ``approx_kl``).
        clipfrac: fraction of tokens whose clipped term was the active one (the gradient is cut there).
        ratio_mean: mean probability ratio π_new / π_old.
    """

    approx_kl: Tensor
    clipfrac: Tensor
    ratio_mean: Tensor


class ValueStats(NamedTuple):
    """Detached diagnostics of ``clipped_value_loss``.

    Attributes:
        clipfrac: fraction of tokens where the clipped value error was the larger one.
        value_mean: mean predicted value.
    """

    clipfrac: Tensor
    value_mean: Tensor


def _reduce(per_token: Tensor, mask: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return masked_sum(per_token, mask)
    if reduction == "mean":
        return masked_mean(per_token, mask)
    if reduction == "none":
        return per_token * mask
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_eps: float = 0.2, clip_eps_high: float | None = None,
                        importance_sampling_level: str = "token",
                        reduction: str = "sum") -> tuple[Tensor, PolicyStats]:
    """PPO's clipped surrogate: per token ``max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε_high))`` with ρ = π / π_old.

    With ``importance_sampling_level="sequence"`` (GSPO, Zheng et al. 2025, eq. 5–7) every token of sequence i
    uses the sequence's ratio ``s_i = exp(mean_t (log π − log π_old))`` (the geometric mean of its token ratios,
    differentiable through every token), clipped as a whole; TRL's ``importance_sampling_level="sequence"``.

    Args:
        logprobs: (B, N) log-probs of the sampled tokens under the current policy (differentiable).
        old_logprobs: (B, N) log-probs under the policy that sampled them.
        advantages: (B, N) per-token advantages, or (B,) one per sequence (GRPO), broadcast over tokens.
        mask: (B, N) 1 on the tokens that count.
        clip_eps: ε, the lower clip 1 − ε (and the upper one unless ``clip_eps_high`` is given).
        clip_eps_high: ε_high for the upper clip 1 + ε_high (DAPO's clip-higher); None uses ``clip_eps``.
        importance_sampling_level: ``"token"`` (PPO, GRPO) or ``"sequence"`` (GSPO); see above.
        reduction: ``"sum"`` over unmasked tokens, ``"mean"`` over them, or ``"none"`` for the (B, N) loss.

    Returns:
        The loss (fp32) and detached stats. With π = π_old the ratio is exactly 1, the loss is −A summed
        (or averaged) and clipfrac is 0.
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got "
                         f"{importance_sampling_level!r}")
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    mask = mask.to(torch.float32)
    log_ratio = logprobs.float() - old_logprobs.float()  # (B, N)
    if importance_sampling_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, -1)[:, None].expand_as(log_ratio)  # (B, 1) → (B, N)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    per_token = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        # The tokens were sampled from π_old: k3 with π_old as the sampling policy, r = π/π_old (cleanrl's).
        stats = PolicyStats(approx_kl=masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask),
                            clipfrac=masked_mean((clipped > unclipped).float(), mask),
                            ratio_mean=masked_mean(ratio, mask))
    return _reduce(per_token, mask, reduction), stats


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
                       clip_range: float | None = 0.2, reduction: str = "sum") -> tuple[Tensor, ValueStats]:
    """PPO's value loss ``½ max((V − R)², (clip(V, V_old ± c) − R)²)`` per token.

    Args:
        values: (B, N) current value predictions (differentiable).
        old_values: (B, N) the predictions made at rollout time.
        returns: (B, N) GAE returns (targets).
        mask: (B, N) 1 on the tokens that count.
        clip_range: c; None disables clipping (plain ½ (V − R)²).
        reduction: as for ``clipped_policy_loss``.

    Returns:
        The loss (fp32) and detached stats.
    """
    mask = mask.to(torch.float32)
    values = values.float()
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token, clipfrac = 0.5 * unclipped, torch.zeros(())
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_values - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).float().detach(), mask)
    return _reduce(per_token, mask, reduction), ValueStats(clipfrac, masked_mean(values.detach(), mask))


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """One update of the adaptive KL coefficient (Ziegler et al. 2019, §2.2; TRL's ``AdaptiveKLController``):
    ``β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n_steps / horizon)``.

    Args:
        kl_coef: β used for the rollout just made.
        kl: the rollout's measured KL(π ‖ π_ref), per sequence (summed over tokens), averaged over sequences.
        target: KL_target.
        horizon: H; the larger, the slower β moves.
        n_steps: samples in the rollout (sequences, all ranks).

    Returns:
        β for the next rollout: it grows while the KL is above target and shrinks below, by at most 20 % ·
        n_steps / H per update.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
