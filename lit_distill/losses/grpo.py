"""Group relative policy optimisation loss (Shao et al. 2024, DeepSeekMath) and its aggregation variants.

Shape legend: B sequences (prompts × G completions), N completion tokens.

Per token: ``max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε_high)) + β·KL_k3(π ‖ π_ref)``, where A is the sequence's group
advantage. How the per-token losses are averaged is what the loss types differ in, and an average over a whole
optimizer step (several micro-batches, several ranks) is only exact if the caller knows the step's denominator.
So ``grpo_loss`` returns the micro-batch's numerator and its share of the denominator; the module sums the
denominators over the step (and ranks) before dividing.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lit_distill.losses.ppo import clipped_policy_loss
from lit_distill.losses.rl import kl_estimate, masked_mean

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


class GRPOStats(NamedTuple):
    """Detached token-mean diagnostics of one ``grpo_loss`` call.

    Attributes:
        kl: k3 estimate of KL(π ‖ π_ref) (0 when β = 0 and no reference is given).
        clip_ratio: fraction of tokens whose clipped term was active.
        approx_kl: k3 estimate of KL(π_old ‖ π) from the probability ratios.
    """

    kl: Tensor
    clip_ratio: Tensor
    approx_kl: Tensor


def grpo_denominator(mask: Tensor, loss_type: str, max_completion_length: Optional[int] = None) -> Tensor:
    """A micro-batch's share of the step's denominator (see ``grpo_loss``); it depends only on the (B, N) mask, so
    the step's total is known before any forward pass."""
    if loss_type == "grpo":
        return (mask.sum(-1) > 0).float().sum()
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return torch.tensor(float(mask.size(0) * max_completion_length), device=mask.device)
    return mask.float().sum()


def step_denominators(masks: list[Tensor], loss_type: str,
                      max_completion_length: Optional[int] = None) -> list[Tensor]:
    """What each micro-batch's ``grpo_loss`` numerator is divided by, given the (B_m, N) masks of the step's
    micro-batches on this rank: the step's total (to be summed over ranks as well) for every loss type but
    ``bnpo``, whose micro-batch ``m`` of ``M`` divides by its own token count × M (at least 1 token)."""
    if loss_type == "bnpo":
        return [grpo_denominator(mask, loss_type).clamp(min=1) * len(masks) for mask in masks]
    total = sum(grpo_denominator(mask, loss_type, max_completion_length) for mask in masks)
    return [total] * len(masks)


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              loss_type: str = "dapo", clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
              beta: float = 0.0, ref_logprobs: Optional[Tensor] = None,
              max_completion_length: Optional[int] = None,
              importance_sampling_level: str = "token") -> tuple[Tensor, Tensor, GRPOStats]:
    """Numerator and denominator of the GRPO loss of one micro-batch.

    The loss of a step is ``Σ numerators / Σ denominators`` over its micro-batches (and ranks):

    * ``grpo``: mean over sequences of each sequence's token mean (the original GRPO; a long completion's tokens
      weigh less). Numerator: Σ per-sequence means; denominator: number of sequences with a real token.
    * ``dapo``: mean over all tokens of the step, on every rank (DAPO's token-level loss; every token weighs the
      same). Numerator: token sum; denominator: token count.
    * ``bnpo``: TRL's: each micro-batch's token mean, averaged over the step's micro-batches and the ranks, so a
      micro-batch with fewer tokens weighs its tokens more (``dapo`` when the step is one micro-batch on one
      rank). Numerator: token sum; denominator: see :func:`step_denominators`.
    * ``dr_grpo``: token sum over a constant, sequences × ``max_completion_length`` (Dr. GRPO: no length bias).

    Args:
        logprobs: (B, N) current log-probs of the sampled tokens (differentiable).
        old_logprobs: (B, N) log-probs under the sampling policy.
        advantages: (B,) sequence advantages, or (B, N) per-token ones (REINFORCE++).
        mask: (B, N) completion mask (truncated completions already zeroed if they are to be ignored).
        loss_type: one of :data:`GRPO_LOSS_TYPES`.
        clip_eps: ε (lower clip, and upper unless ``clip_eps_high``).
        clip_eps_high: ε_high, the upper clip (DAPO's clip-higher).
        beta: KL coefficient β; 0 needs no ``ref_logprobs``.
        ref_logprobs: (B, N) reference log-probs, required when β > 0.
        max_completion_length: the generation budget, required by ``dr_grpo``.
        importance_sampling_level: ``"token"`` (GRPO) or ``"sequence"`` (GSPO, Zheng et al. 2025: one clipped
            ratio per sequence, see :func:`~lit_distill.losses.clipped_policy_loss`). GSPO's objective is a mean
            over sequences, i.e. ``loss_type="grpo"``; the token-sum types weigh a sequence by its length.

    Returns:
        numerator (fp32 scalar, differentiable), denominator (fp32 scalar), detached stats.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    mask = mask.to(torch.float32)
    per_token, policy_stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps,
                                                  clip_eps_high=clip_eps_high, reduction="none",
                                                  importance_sampling_level=importance_sampling_level)
    kl = kl_estimate(logprobs, ref_logprobs, "k3") if ref_logprobs is not None else torch.zeros_like(per_token)
    per_token = (per_token + beta * kl) * mask

    denominator = grpo_denominator(mask, loss_type, max_completion_length)
    if loss_type == "grpo":
        numerator = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    else:
        numerator = per_token.sum()
    stats = GRPOStats(kl=masked_mean(kl.detach(), mask), clip_ratio=policy_stats.clipfrac,
                      approx_kl=policy_stats.approx_kl)
    return numerator, denominator, stats
