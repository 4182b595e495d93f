"""Preference losses on pairs (chosen, rejected): direct preference optimisation and reward modelling.

Shapes: B batch (pairs). Inputs are per-sequence scalars: sequence log-probs (see
``lit_distill.losses.logprobs.sequence_logprobs_from_logits``) or reward-model scores.

Losses are computed in fp32 (float64 for float64 inputs) and return ``(loss, stats)`` with detached stats.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch.nn.functional as F
from torch import Tensor

from lit_distill.losses.dtypes import compute_dtype

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REDUCTIONS = ("mean", "sum", "none")


class DPOStats(NamedTuple):
    """Detached implicit rewards of one ``dpo_loss`` call: β times the policy / reference log-ratios.

    Attributes:
        rewards_chosen: (B,) β (log π(y_c) − log π_ref(y_c)).
        rewards_rejected: (B,) β (log π(y_r) − log π_ref(y_r)).
        margin: (B,) ``rewards_chosen − rewards_rejected``.
        accuracy: scalar fraction of pairs with ``margin > 0``.
    """

    rewards_chosen: Tensor
    rewards_rejected: Tensor
    margin: Tensor
    accuracy: Tensor


class RewardStats(NamedTuple):
    """Detached diagnostics of one ``reward_loss`` call (scalars).

    Attributes:
        accuracy: fraction of pairs with r_c > r_r (the margin ``m`` is not subtracted).
        margin: mean of r_c − r_r.
        chosen_mean: mean of r_c.
        rejected_mean: mean of r_r.
    """

    accuracy: Tensor
    margin: Tensor
    chosen_mean: Tensor
    rejected_mean: Tensor


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, reduction: str = "mean") -> tuple[Tensor, DPOStats]:
    """Direct preference optimisation losses on the log-ratio margin of each pair.

    With h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)) and ε = ``label_smoothing``:

    * ``sigmoid``: −(1 − ε) log σ(βh) − ε log σ(−βh). ε = 0 is DPO (Rafailov et al. 2023, eq. 7); ε > 0 is
      conservative DPO (Mitchell 2023), the cross-entropy against labels flipped with probability ε, minimised
      at a finite margin βh = log((1 − ε) / ε) instead of pushing it to infinity.
    * ``ipo``: (h − 1/(2β))², the IPO loss (Azar et al. 2023, eq. 17, with τ = β): a squared loss regressing h
      to a fixed target, so it does not over-fit deterministic preferences. IPO is defined on length-normalised
      log-probs: the caller passes mean per-token log-probs (sum / count) for this type; the function itself
      does not care.
    * ``hinge``: max(0, 1 − βh), the calibration hinge loss of SLiC (Zhao et al. 2023) with margin δ = 1,
      applied to the reference-normalised margin βh (as in RSO, Liu et al. 2024) rather than to raw log-probs.
    * ``robust``: [−(1 − ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε), robust DPO (Chowdhury et al. 2024): the
      unbiased estimate of the clean DPO loss when each label is flipped with probability ε. Unlike ``sigmoid``
      with ε > 0 it keeps decreasing in h (it is unbounded below).

    The reference log-probs are detached.

    Args:
        policy_chosen_logps: (B,) policy log-probs of the chosen responses.
        policy_rejected_logps: (B,) policy log-probs of the rejected responses.
        reference_chosen_logps: (B,) reference-model log-probs of the chosen responses.
        reference_rejected_logps: (B,) reference-model log-probs of the rejected responses.
        beta: β > 0, inverse strength of the implicit KL regularisation to the reference.
        loss_type: one of ``DPO_LOSS_TYPES``.
        label_smoothing: ε in [0, 0.5), the assumed label-flip rate; only ``sigmoid`` and ``robust`` use it.
        reduction: ``"mean"`` or ``"sum"`` over pairs, or ``"none"`` for the (B,) per-pair losses.

    Returns:
        The fp32 loss (scalar, or (B,) for ``"none"``) and ``DPOStats``.

    Raises:
        ValueError: for an invalid argument (named in the message) or inputs of different shapes.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing != 0.0 and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing is only used by the sigmoid and robust loss types, got "
                         f"label_smoothing={label_smoothing} with loss_type={loss_type!r}")
    _check_reduction(reduction)
    inputs = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if len({tuple(x.shape) for x in inputs}) != 1:
        raise ValueError("policy_chosen_logps, policy_rejected_logps, reference_chosen_logps and "
                         f"reference_rejected_logps must have the same shape, got {[tuple(x.shape) for x in inputs]}")
    dtype = compute_dtype(*inputs)

    chosen_logratios = policy_chosen_logps.to(dtype) - reference_chosen_logps.detach().to(dtype)  # (B,)
    rejected_logratios = policy_rejected_logps.to(dtype) - reference_rejected_logps.detach().to(dtype)  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = F.relu(1.0 - beta * h)
    else:  # robust
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)

    rewards_chosen = beta * chosen_logratios.detach()  # (B,)
    rewards_rejected = beta * rejected_logratios.detach()  # (B,)
    margin = rewards_chosen - rewards_rejected  # (B,)
    stats = DPOStats(rewards_chosen=rewards_chosen, rewards_rejected=rewards_rejected, margin=margin,
                     accuracy=(margin > 0).to(dtype).mean())
    return _reduce(losses, reduction), stats


def reward_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Optional[Tensor] = None, *,
                center_coefficient: float = 0.0, reduction: str = "mean") -> tuple[Tensor, RewardStats]:
    """Bradley–Terry pairwise loss of a reward model, with optional margin and reward centering.

    Per pair: −log σ(r_c − r_r − m) + η (r_c + r_r)². The first term is the ranking loss of Llama 2
    (Touvron et al. 2023, eq. 1), with the per-pair margin m of their eq. 2 (larger for more clearly
    preferred pairs). The second, with η = ``center_coefficient``, is the centering term of Eisenstein et al.
    2023: the Bradley–Terry loss only sees differences, so it leaves the rewards' offset free; the penalty pins
    it near 0, making scores comparable across runs and ensemble members.

    Args:
        chosen_scores: (B,) rewards r_c of the chosen responses.
        rejected_scores: (B,) rewards r_r of the rejected responses.
        margin: (B,) margins m, or None for m = 0.
        center_coefficient: η >= 0.
        reduction: ``"mean"`` or ``"sum"`` over pairs, or ``"none"`` for the (B,) per-pair losses.

    Returns:
        The fp32 loss (scalar, or (B,) for ``"none"``) and ``RewardStats``.

    Raises:
        ValueError: for an invalid argument (named in the message) or inputs of different shapes.
    """
    if not center_coefficient >= 0:
        raise ValueError(f"center_coefficient must be >= 0, got {center_coefficient}")
    _check_reduction(reduction)
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores "
                         f"{tuple(rejected_scores.shape)} must have the same shape")
    if margin is not None and margin.shape != chosen_scores.shape:
        raise ValueError(f"margin {tuple(margin.shape)} must have the shape of chosen_scores "
                         f"{tuple(chosen_scores.shape)}")
    dtype = compute_dtype(chosen_scores, rejected_scores)
    chosen, rejected = chosen_scores.to(dtype), rejected_scores.to(dtype)  # (B,), (B,)

    difference = chosen - rejected  # (B,)
    logits = difference if margin is None else difference - margin.to(dtype)  # (B,)
    losses = -F.logsigmoid(logits) + center_coefficient * (chosen + rejected) ** 2  # (B,)

    difference = difference.detach()
    stats = RewardStats(accuracy=(difference > 0).to(dtype).mean(), margin=difference.mean(),
                        chosen_mean=chosen.detach().mean(), rejected_mean=rejected.detach().mean())
    return _reduce(losses, reduction), stats
