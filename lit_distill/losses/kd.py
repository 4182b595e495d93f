"""Logit knowledge-distillation losses: token-level divergences between teacher and student distributions.

Shapes: B batch, T time (sequence positions), V vocab, N tokens (rows of logits, e.g. the unmasked positions).

All divergences are computed in fp32 (or float64 for float64 inputs) in log space, from
``log_softmax(logits / temperature)`` of both models, with p_T the teacher's and p_S the student's distribution.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_distill.losses.dtypes import compute_dtype

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("mean", "sum")


class KDStats(NamedTuple):
    """Detached diagnostics of one ``kd_loss`` call (all 0 when every token is masked).

    Attributes:
        divergence: mean per-token divergence at temperature T, without the T² factor (a true divergence, >= 0).
        ce: mean per-token hard-label cross-entropy of the student at temperature 1.
        num_tokens: number of unmasked tokens (int64 scalar).
    """

    divergence: Tensor
    ce: Tensor
    num_tokens: Tensor


def _check_divergence_args(divergence: str, temperature: float, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] for jsd, got {beta}")
    if divergence.startswith("skew") and not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1) for {divergence} (beta = 1 makes it identically 0), got {beta}")


def check_kd_args(divergence: str, temperature: float, beta: float, alpha: float, reduction: str,
                  chunk_size: Optional[int]) -> None:
    """The argument checks of ``kd_loss`` and ``topk_kd_loss``; ValueError naming the bad argument."""
    _check_divergence_args(divergence, temperature, beta)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / temperature) over the last dim, with -inf (masked-out logits) clamped to the most
    negative finite value: the probability is still 0, but p · log p becomes 0 · finite = 0 instead of NaN."""
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1).clamp(min=torch.finfo(logits.dtype).min)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = Σ_v p (log p − log q); (N, V), (N, V) -> (N,). Terms where p underflows to 0 are 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """log(weight · p + (1 − weight) · q), elementwise, without leaving log space (no log(0) when both underflow)."""
    if weight == 0.0:
        return log_q  # log(0) would be -inf; the mixture is exactly q
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def divergence_from_log_probs(log_p_s: Tensor, log_p_t: Tensor, divergence: str, beta: float) -> Tensor:
    """Per-token divergence from student and teacher log-probabilities; (N, V), (N, V) -> (N,)."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(log_p_t, log_p_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(log_p_s, log_p_t)
    if divergence == "jsd":
        log_m = _log_mixture(log_p_t, log_p_s, beta)  # m = β p_T + (1 − β) p_S
        return beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)
    if divergence == "skew_forward_kl":
        return _kl(log_p_t, _log_mixture(log_p_t, log_p_s, beta))
    if divergence == "skew_reverse_kl":
        return _kl(log_p_s, _log_mixture(log_p_s, log_p_t, beta))
    return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(-1)  # tvd


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, divergence: str = "forward_kl",
                     temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Per-token divergence between the teacher's and the student's next-token distributions.

    With p_T = softmax(teacher_logits / T) and p_S = softmax(student_logits / T):

    * ``forward_kl``: KL(p_T ‖ p_S) (mode covering; classic KD, Hinton et al. 2015).
    * ``reverse_kl``: KL(p_S ‖ p_T) (mode seeking).
    * ``jsd``: generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of
      Language Models"): with m = β p_T + (1 − β) p_S, JSD(β) = β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m).
      This expression tends to 0 as β → 0 or β → 1 (JSD(β)/β → KL(p_T ‖ p_S) and JSD(β)/(1 − β) →
      KL(p_S ‖ p_T)), so the endpoints are a convention, as in TRL: β = 0 is exactly ``forward_kl`` and β = 1
      exactly ``reverse_kl``.
    * ``skew_forward_kl``: KL(p_T ‖ β p_T + (1 − β) p_S) and ``skew_reverse_kl``: KL(p_S ‖ β p_S + (1 − β) p_T),
      the skew KLs of DistiLLM (Ko et al. 2024, β being their skew α; β = 0 gives the plain KL). Needs β < 1.
    * ``tvd``: total variation distance ½ Σ_v |p_T − p_S|.

    Args:
        student_logits: (N, V) student logits; any leading shape works, as long as both inputs share it.
        teacher_logits: (N, V) teacher logits; never receives gradients.
        divergence: one of ``DIVERGENCES``.
        temperature: T > 0 dividing both logits.
        beta: JSD interpolation weight in [0, 1] or skew coefficient in [0, 1); ignored by the others.

    Returns:
        (N,) divergence per token, in fp32 (float64 for float64 inputs) whatever the input dtype.

    Raises:
        ValueError: for an unknown divergence, temperature <= 0, beta out of range, or mismatched shapes.
    """
    _check_divergence_args(divergence, temperature, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (see align_vocab)")
    dtype = compute_dtype(student_logits, teacher_logits)
    log_p_s = log_probs(student_logits.to(dtype), temperature)
    log_p_t = log_probs(teacher_logits.detach().to(dtype), temperature)
    return divergence_from_log_probs(log_p_s, log_p_t, divergence, beta)


def align_vocab(student_logits: Tensor, teacher_logits: Tensor,
                vocab_size: Optional[int]) -> tuple[Tensor, Tensor]:
    """Make the vocab (last) dims of both logits equal.

    Models often pad their embedding matrix (e.g. to a multiple of 64), so teacher and student may differ only
    in padding rows that no token id reaches. Truncating both to the real vocabulary drops them.

    Args:
        student_logits: (..., Vs) student logits.
        teacher_logits: (..., Vt) teacher logits.
        vocab_size: number of real token ids (``len(tokenizer)``); None when no padding is expected.

    Returns:
        The two logits as views (..., V), V = ``vocab_size`` if given, else Vs (== Vt).

    Raises:
        ValueError: if either model has fewer than ``vocab_size`` logits, or if Vs != Vt and ``vocab_size``
            is None.
    """
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(f"student_logits have {student_vocab} logits per token but teacher_logits have "
                             f"{teacher_vocab}; pass vocab_size (the tokenizer's length) to align vocabularies "
                             "that differ only in padding")
        return student_logits, teacher_logits
    if vocab_size < 1 or student_vocab < vocab_size or teacher_vocab < vocab_size:
        raise ValueError(f"vocab_size={vocab_size} but student_logits have {student_vocab} and teacher_logits "
                         f"{teacher_vocab} logits per token; expected both to have at least vocab_size >= 1 "
                         "(the models' vocabularies do not cover the tokenizer)")
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def student_log_probs(student_logits: Tensor, labels: Tensor, temperature: float,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(n, V), (n,) -> the summed hard-label cross-entropy at temperature 1 (scalar) and the student's
    log-probabilities at ``temperature`` (n, V), both in ``dtype``."""
    student_logits = student_logits.to(dtype)  # (n, V) upcast once
    log_p_s = log_probs(student_logits, 1.0)
    ce = -log_p_s.gather(-1, labels[:, None]).sum()
    if temperature != 1.0:
        log_p_s = log_probs(student_logits, temperature)
    return ce, log_p_s


def _chunk_sums(student_logits: Tensor, teacher: tuple[Tensor], labels: Tensor, divergence: str,
                temperature: float, beta: float, dtype: torch.dtype) -> Tensor:
    """(n, V), ((n, V),), (n,) -> (2,): the chunk's summed cross-entropy and summed divergence."""
    ce, log_p_s = student_log_probs(student_logits, labels, temperature, dtype)
    log_p_t = log_probs(teacher[0].to(dtype), temperature)
    return torch.stack([ce, divergence_from_log_probs(log_p_s, log_p_t, divergence, beta).sum()])


class ChunkedKD(torch.autograd.Function):
    """The weighted loss sum over unmasked positions, ``chunk_size`` positions at a time, with each chunk's
    gradient computed during the forward pass.

    ``teacher`` is a tuple of tensors indexed like ``labels`` in their leading dims ((B, T), or (N,) for rows
    already gathered): the teacher's logits (..., V) for the full-vocabulary loss, or its cached top-k ids,
    log-probs and tail (``topk_kd_loss``).
    ``chunk_sums(student (n, V), teacher rows, labels (n,))`` returns the chunk's (CE sum, divergence sum).

    The loss is a sum of per-position terms, so the gradient of a position's logits depends on that position only.
    Computing it chunk by chunk in forward bounds peak memory to the student's gradient buffer (in the student's
    dtype, which backward must produce anyway) plus one chunk's fp32 intermediates; nothing else is kept for
    backward, and no masked copy of the full logits is made.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher, labels, positions, weights, chunk_size, chunk_sums):
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student_logits) if needs_grad else None  # like student_logits: (..., V)
        sums = weights.new_zeros(2)  # (CE sum, divergence sum)
        for chunk in positions.split(chunk_size):  # (n, labels.dim()) indices of unmasked positions
            index = tuple(chunk.unbind(-1))  # one index tensor per leading dim: (batch, time), or (row,)
            student = student_logits[index]  # (n, V): a copy of this chunk only
            rows = tuple(tensor[index] for tensor in teacher)
            targets = labels[index]
            if needs_grad:
                with torch.enable_grad():
                    student = student.detach().requires_grad_(True)
                    chunk_sum = chunk_sums(student, rows, targets)  # (2,)
                    (chunk_grad,) = torch.autograd.grad(weights @ chunk_sum, student)
                grad[index] = chunk_grad
            else:
                chunk_sum = chunk_sums(student, rows, targets)
            sums += chunk_sum.detach()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(sums)
        return weights @ sums, sums

    @staticmethod
    def backward(ctx, grad_loss, grad_sums):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, divergence: str = "forward_kl",
            temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5, ignore_index: int = -100,
            chunk_size: Optional[int] = None, reduction: str = "mean",
            vocab_size: Optional[int] = None) -> tuple[Tensor, KDStats]:
    """Distillation loss: hard-label cross-entropy mixed with a teacher-student divergence.

    Per unmasked token t, ``loss_t = alpha · CE_t + (1 − alpha) · T² · D_t`` where CE_t is the student's
    cross-entropy on ``labels`` at temperature 1 and D_t is ``token_divergence`` at temperature T. The T² factor
    (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") keeps the divergence's gradient
    magnitude comparable across temperatures, since softened gradients scale as 1/T².

    Inputs are already aligned: position t of the logits predicts ``labels[:, t]`` (the caller shifts).
    Only unmasked rows are used. With ``chunk_size`` they are processed that many at a time in fp32, each chunk's
    gradient being computed in the forward pass (``ChunkedKD``), so memory beyond the inputs is one gradient
    buffer plus one chunk's intermediates. Chunked and unchunked results agree up to summation order.

    Args:
        student_logits: (B, T, Vs) student logits (any dtype; upcast to fp32 chunk by chunk), or (N, Vs) rows
            already gathered at the labelled positions (``models.forward.labelled_logits``).
        teacher_logits: (B, T, Vt) or (N, Vt) teacher logits, like ``student_logits``; detached here.
        labels: (B, T) or (N,) target token ids; ``ignore_index`` masks a position out of the loss and the stats.
        divergence: one of ``DIVERGENCES`` (see ``token_divergence``).
        temperature: T > 0 dividing both logits in the divergence.
        alpha: weight in [0, 1] of the cross-entropy; ``1 − alpha`` weighs the divergence.
        beta: JSD interpolation / skew coefficient (see ``token_divergence``).
        ignore_index: label value of masked positions.
        chunk_size: rows per chunk; None processes all unmasked tokens at once.
        reduction: ``"mean"`` over unmasked tokens, or ``"sum"`` (the caller normalises, e.g. by the token
            count of a whole optimizer step).
        vocab_size: real vocabulary size, to drop embedding padding (see ``align_vocab``).

    Returns:
        The scalar fp32 loss (0, still attached to the graph, when every token is masked) and ``KDStats``.

    Raises:
        ValueError: for an invalid argument (named in the message) or mismatched leading shapes.
    """
    check_kd_args(divergence, temperature, beta, alpha, reduction, chunk_size)
    if not student_logits.shape[:-1] == teacher_logits.shape[:-1] == labels.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)}, teacher_logits "
                         f"{tuple(teacher_logits.shape)} and labels {tuple(labels.shape)} must share the leading "
                         "(B, T) or (N,) shape")
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits.detach(), vocab_size)
    dtype = compute_dtype(student_logits, teacher_logits)

    chunk_sums = partial(_chunk_sums, divergence=divergence, temperature=temperature, beta=beta, dtype=dtype)
    return reduce_kd(student_logits, (teacher_logits,), labels, chunk_sums, alpha=alpha, temperature=temperature,
                     ignore_index=ignore_index, chunk_size=chunk_size, reduction=reduction, dtype=dtype)


def reduce_kd(student_logits: Tensor, teacher: tuple[Tensor, ...], labels: Tensor, chunk_sums, *, alpha: float,
              temperature: float, ignore_index: int, chunk_size: Optional[int], reduction: str,
              dtype: torch.dtype) -> tuple[Tensor, KDStats]:
    """``alpha · CE + (1 − alpha) · T² · D`` summed over unmasked positions (all at once or chunked) and reduced;
    what ``kd_loss`` and ``topk_kd_loss`` share once their per-chunk ``chunk_sums`` is fixed."""
    mask = labels != ignore_index  # (B, T)
    num_tokens = mask.sum()
    denominator = num_tokens.clamp(min=1)  # an all-masked batch has zero sums: its mean is 0, not NaN
    weights = torch.tensor([alpha, (1.0 - alpha) * temperature ** 2], dtype=dtype, device=student_logits.device)
    if reduction == "mean":
        # 1/N inside the weights: a chunk's gradient is scaled in fp32 and rounded to the student's dtype once,
        # rather than stored rounded and scaled (rounded) again in backward.
        weights = weights / denominator
    if chunk_size is None:
        # Indexing the (B, T, ...) views with the (B, T) mask copies only the unmasked rows, even from the
        # non-contiguous slices made by the causal shift and align_vocab; rows that are all scored (a caller's
        # labelled logits, an unpadded batch) are only flattened, which is a view when they are contiguous.
        all_scored = bool(mask.all())  # one host sync, as boolean indexing would cost anyway

        def rows(tensor: Tensor) -> Tensor:
            return tensor.flatten(0, mask.dim() - 1) if all_scored else tensor[mask]

        sums = chunk_sums(rows(student_logits), tuple(rows(tensor) for tensor in teacher), rows(labels))  # (2,)
        loss = weights @ sums
    else:
        loss, sums = ChunkedKD.apply(student_logits, teacher, labels, mask.nonzero(), weights, chunk_size,
                                     chunk_sums)
    ce_sum, divergence_sum = sums.detach().unbind()  # (2,) -> two scalars
    stats = KDStats(divergence=divergence_sum.detach() / denominator, ce=ce_sum.detach() / denominator,
                    num_tokens=num_tokens)
    return loss, stats
