"""Preference losses on pairs (chosen, rejected): DPO and its variants, the reference-free SimPO and ORPO, and
reward modelling; and KTO on unpaired completions labelled desirable or undesirable.

Shapes: B batch (pairs, or unpaired completions for KTO). Inputs are per-sequence scalars: sequence log-probs (see
``lit_distill.losses.logprobs.sequence_logprobs_from_logits``), their per-token means, or reward-model scores.

Losses are computed in fp32 (float64 for float64 inputs) and return ``(loss, stats)`` with detached stats.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_distill.losses.dtypes import compute_dtype

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")  # pairwise losses on the policy's mean per-token log-probs alone
REDUCTIONS = ("mean", "sum", "none")


class DPOStats(NamedTuple):
    """Detached implicit rewards of one ``dpo_loss`` call (β times the policy / reference log-ratios) or ``simpo_loss``
    call (β times the mean per-token log-probs).

    Attributes:
        rewards_chosen: (B,) β (log π(y_c) − log π_ref(y_c)), or β log π(y_c) / |y_c| for SimPO.
        rewards_rejected: (B,) β (log π(y_r) − log π_ref(y_r)), or β log π(y_r) / |y_r| for SimPO.
        margin: (B,) ``rewards_chosen − rewards_rejected``.
        accuracy: scalar fraction of pairs with ``margin > 0``.
    """

    rewards_chosen: Tensor
    rewards_rejected: Tensor
    margin: Tensor
    accuracy: Tensor


class ORPOStats(NamedTuple):
    """Detached diagnostics of one ``orpo_loss`` call.

    Attributes:
        rewards_chosen: (B,) log odds(y_c) = a_c − log(1 − exp(a_c)), a_c the mean per-token log-prob.
        rewards_rejected: (B,) log odds(y_r).
        margin: (B,) the log odds ratio ``rewards_chosen − rewards_rejected``.
        accuracy: scalar fraction of pairs with ``margin > 0``.
        nll: scalar mean over pairs of the chosen responses' mean per-token NLL −a_c (the SFT term).
    """

    rewards_chosen: Tensor
    rewards_rejected: Tensor
    margin: Tensor
    accuracy: Tensor
    nll: Tensor


class KTOStats(NamedTuple):
    """Detached diagnostics of one ``kto_loss`` call.

    Attributes:
        rewards: (B,) β (log π(y|x) − log π_ref(y|x)) of each completion.
        desirable: (B,) bool labels, to split ``rewards`` into desirable and undesirable means.
        kl: scalar reference point z_ref, the clamped KL estimate.
    """

    rewards: Tensor
    desirable: Tensor
    kl: Tensor


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
        losses = _smoothed_sigmoid_loss(beta * h, eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = F.relu(1.0 - beta * h)
    else:  # robust
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)

    return _reduce(losses, reduction), _pair_stats(beta * chosen_logratios, beta * rejected_logratios)


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """−(1 − ε) log σ(x) − ε log σ(−x) per pair: the logistic loss when each label is flipped with probability ε."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _pair_stats(rewards_chosen: Tensor, rewards_rejected: Tensor) -> DPOStats:
    """``DPOStats`` of (B,) implicit rewards (detached): their margins and the share of pairs ranked right."""
    chosen, rejected = rewards_chosen.detach(), rewards_rejected.detach()
    margin = chosen - rejected  # (B,)
    return DPOStats(rewards_chosen=chosen, rewards_rejected=rejected, margin=margin,
                    accuracy=(margin > 0).to(chosen.dtype).mean())


def _check_pair(chosen: Tensor, rejected: Tensor) -> None:
    if chosen.shape != rejected.shape:
        raise ValueError(f"policy_chosen_logps {tuple(chosen.shape)} and policy_rejected_logps "
                         f"{tuple(rejected.shape)} must have the same shape")


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0, reduction: str = "mean") -> tuple[Tensor, DPOStats]:
    """SimPO (Meng et al. 2024, eq. 6): a reference-free DPO on length-normalised log-probs with a target margin.

    Per pair, with a = log π(y|x) / |y| the mean per-token log-prob and ε = ``label_smoothing``:
    h = β a_c − β a_r − γ, loss = −(1 − ε) log σ(h) − ε log σ(−h) (ε = 0 is the paper's loss; ε > 0 the conservative
    form TRL's CPOTrainer also applies). The margin γ asks the chosen reward to beat the rejected one by γ, not
    merely to exceed it. γ is the paper's γ itself; the authors' code and configs give ``gamma_beta_ratio`` = γ/β
    instead, and TRL's ``simpo_gamma`` is γ (TRL subtracts ``simpo_gamma / beta`` from a_c − a_r before scaling by β).

    Args:
        policy_chosen_logps: (B,) mean per-token log-probs a_c of the chosen responses.
        policy_rejected_logps: (B,) mean per-token log-probs a_r of the rejected responses.
        beta: β > 0, the reward scale (the paper uses 2 to 10).
        gamma: γ >= 0, the target reward margin (the paper uses γ/β of 0.3 to 1.6).
        label_smoothing: ε in [0, 0.5).
        reduction: ``"mean"`` or ``"sum"`` over pairs, or ``"none"`` for the (B,) per-pair losses.

    Returns:
        The fp32 loss (scalar, or (B,) for ``"none"``) and ``DPOStats`` with rewards β a.

    Raises:
        ValueError: for an invalid argument (named in the message) or inputs of different shapes.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_reduction(reduction)
    _check_pair(policy_chosen_logps, policy_rejected_logps)
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps)

    rewards_chosen = beta * policy_chosen_logps.to(dtype)  # (B,)
    rewards_rejected = beta * policy_rejected_logps.to(dtype)  # (B,)
    losses = _smoothed_sigmoid_loss(rewards_chosen - rewards_rejected - gamma, label_smoothing)  # (B,)
    return _reduce(losses, reduction), _pair_stats(rewards_chosen, rewards_rejected)


def log_odds(mean_logps: Tensor) -> Tensor:
    """log(p / (1 − p)) of p = exp(a) for mean per-token log-probs a < 0, shape preserved.

    log(1 − exp(a)) is ``log(-expm1(a))`` near 0, where 1 − exp(a) cancels, and ``log1p(-exp(a))`` below −log 2
    (Mächler 2012); a = 0 gives +inf, as p = 1 has infinite odds.
    """
    log1mexp = torch.where(mean_logps < -0.6931471805599453, torch.log1p(-torch.exp(mean_logps)),
                           torch.log(-torch.expm1(mean_logps)))
    return mean_logps - log1mexp


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, beta: float = 0.1,
              reduction: str = "mean") -> tuple[Tensor, ORPOStats]:
    """ORPO (Hong et al. 2024, eqs. 6–7): SFT on the chosen response plus an odds-ratio preference term, no reference.

    Per pair, with a the mean per-token log-prob and odds(y) = exp(a) / (1 − exp(a)):
    loss = −a_c + λ · (−log σ(log odds(y_c) − log odds(y_r))), λ = ``beta`` (TRL's ORPOConfig name for λ).

    Args:
        policy_chosen_logps: (B,) mean per-token log-probs a_c of the chosen responses (all < 0).
        policy_rejected_logps: (B,) mean per-token log-probs a_r of the rejected responses (all < 0).
        beta: λ > 0, the weight of the odds-ratio term (the paper uses 0.1 to 1).
        reduction: ``"mean"`` or ``"sum"`` over pairs, or ``"none"`` for the (B,) per-pair losses.

    Returns:
        The fp32 loss (scalar, or (B,) for ``"none"``) and ``ORPOStats``.

    Raises:
        ValueError: for an invalid argument (named in the message) or inputs of different shapes.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_reduction(reduction)
    _check_pair(policy_chosen_logps, policy_rejected_logps)
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps)
    chosen, rejected = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)  # (B,), (B,)

    odds_chosen, odds_rejected = log_odds(chosen), log_odds(rejected)  # (B,), (B,)
    nll = -chosen  # (B,)
    losses = nll - beta * F.logsigmoid(odds_chosen - odds_rejected)  # (B,)

    margin = (odds_chosen - odds_rejected).detach()  # (B,)
    stats = ORPOStats(rewards_chosen=odds_chosen.detach(), rewards_rejected=odds_rejected.detach(), margin=margin,
                      accuracy=(margin > 0).to(dtype).mean(), nll=nll.detach().mean())
    return _reduce(losses, reduction), stats


def kto_loss(policy_logps: Tensor, reference_logps: Tensor, policy_kl_logps: Optional[Tensor],
             reference_kl_logps: Optional[Tensor], desirable: Tensor, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, reduction: str = "mean",
             kl_mean: Optional[Tensor] = None) -> tuple[Tensor, KTOStats]:
    """Kahneman–Tversky optimisation (Ethayarajh et al. 2024, eq. 8) on unpaired completions.

    With r = log π(y|x) − log π_ref(y|x) and the reference point z = max(0, mean_B(log π(y'|x) − log π_ref(y'|x)))
    over mismatched (x, y') pairs of the batch (an estimate of KL(π‖π_ref), detached: it sets the point of loss
    aversion, it is not trained), each completion's loss is
    λ_D (1 − σ(β (r − z))) when desirable and λ_U (1 − σ(β (z − r))) when undesirable.

    Args:
        policy_logps: (B,) policy log-probs (sums over tokens) of each completion given its prompt.
        reference_logps: (B,) reference log-probs of the same.
        policy_kl_logps: (B,) policy log-probs of mismatched completions y' (another row's) given each prompt;
            None with ``kl_mean``.
        reference_kl_logps: (B,) reference log-probs of the same; None with ``kl_mean``.
        desirable: (B,) bool, True for a desirable completion.
        beta: β > 0, the scale of the implied reward.
        desirable_weight: λ_D > 0; the paper keeps λ_D n_D / (λ_U n_U) in [1, 4/3].
        undesirable_weight: λ_U > 0.
        reduction: ``"mean"`` or ``"sum"`` over completions, or ``"none"`` for the (B,) per-completion losses.
        kl_mean: the unclamped z computed by the caller over more rows than this call's (TRL averages it over
            all processes); None: the mean over this call's mismatched rows.

    Returns:
        The fp32 loss (scalar, or (B,) for ``"none"``) and ``KTOStats``.

    Raises:
        ValueError: for an invalid argument (named in the message) or inputs of different shapes.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(f"desirable_weight and undesirable_weight must be > 0, got {desirable_weight} and "
                         f"{undesirable_weight}")
    _check_reduction(reduction)
    if kl_mean is None and (policy_kl_logps is None or reference_kl_logps is None):
        raise ValueError("policy_kl_logps and reference_kl_logps are needed unless kl_mean is given")
    inputs = tuple(x for x in (policy_logps, reference_logps, policy_kl_logps, reference_kl_logps, desirable)
                   if x is not None)
    if len({tuple(x.shape) for x in inputs}) != 1:
        raise ValueError("policy_logps, reference_logps, policy_kl_logps, reference_kl_logps and desirable must have "
                         f"the same shape, got {[tuple(x.shape) for x in inputs]}")
    dtype = compute_dtype(*inputs[:-1])
    desirable = desirable.bool()

    logratios = policy_logps.to(dtype) - reference_logps.detach().to(dtype)  # (B,)
    if kl_mean is None:
        kl_mean = (policy_kl_logps.detach().to(dtype) - reference_kl_logps.detach().to(dtype)).mean()
    kl = kl_mean.detach().to(dtype).clamp(min=0)  # ()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))  # (B,)

    stats = KTOStats(rewards=beta * logratios.detach(), desirable=desirable, kl=kl)
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
