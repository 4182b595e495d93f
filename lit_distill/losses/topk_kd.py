"""Knowledge distillation from a teacher's top-k log-probabilities (a logit cache or an API's ``top_logprobs``).

Shapes: B batch, T time, V vocab, K cached tokens per position, N unmasked positions.

Definition: top-k plus one tail bucket. At each position the teacher's distribution is coarsened to K + 1
outcomes: its K most likely tokens, and "any other token" holding the remaining mass
``1 − Σ_k p_T(k)``. The student's distribution is coarsened the same way, over the *teacher's* K ids:
``q_S(k)`` for those ids and ``1 − Σ_k q_S(k)`` for the rest. Every divergence of ``kd_loss`` is then taken
between the two (K + 1)-outcome distributions.

Why not renormalised top-k: renormalising the teacher over its K tokens inflates their probabilities by
1 / (1 − tail), and a student trained against it is pushed to put all of its mass on K tokens, i.e. to be
more confident than the teacher; the renormalised loss is also not 0 when the student equals the teacher.
The tail bucket keeps the teacher's total mass outside the top-k, is 0 exactly when the student agrees with
the teacher on the K tokens and on the tail mass, and equals the full-vocabulary divergence when K = V.

Bias (forward KL; the data-processing inequality): the full-vocabulary KL splits exactly into the coarsened
KL plus the tail's share, ``KL(p_T ‖ q_S) = KL_K+1(p_T ‖ q_S) + p_T(tail) · KL(p_T(·|tail) ‖ q_S(·|tail))``,
so the top-k loss never exceeds the full one and misses only how the student spreads its tail mass among the
V − K tokens, weighted by the teacher's tail mass (small for a peaked LM teacher; see the tests and README).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_distill.losses.dtypes import compute_dtype
from lit_distill.losses.kd import (KDStats, check_kd_args, divergence_from_log_probs, reduce_kd,
                                   student_log_probs)


def tail_log_prob(log_probs: Tensor, topk_ids: Tensor) -> Tensor:
    """log(1 − Σ_k p(k)) computed as the logsumexp of the tokens outside ``topk_ids`` (stable when the tail is
    tiny); (n, V), (n, K) -> (n,). The top-k entries are replaced by the most negative finite value rather than
    -inf, so a tail that is empty (K = V) gives a finite, vanishing log-mass and gradients without NaN."""
    outside = log_probs.scatter(-1, topk_ids, torch.finfo(log_probs.dtype).min)  # (n, V)
    return outside.logsumexp(-1)


def coarsened_log_probs(log_probs: Tensor, topk_ids: Tensor) -> Tensor:
    """A full distribution's log-probs coarsened to (K + 1) outcomes: the ``topk_ids`` and the tail bucket.

    Args:
        log_probs: (n, V) log-probabilities.
        topk_ids: (n, K) int64 token ids, distinct within a row.

    Returns:
        (n, K + 1) log-probabilities summing to 1 in probability space; the last column is the tail.
    """
    return torch.cat([log_probs.gather(-1, topk_ids), tail_log_prob(log_probs, topk_ids)[:, None]], dim=-1)


def teacher_log_probs(topk_logprobs: Tensor, tail_logprob: Tensor, dtype: torch.dtype) -> Tensor:
    """The teacher's (K + 1)-outcome log-probs from stored top-k values (n, K) and tail (n,); renormalised in log
    space, so that rounding of the stored values (fp16) cannot leave a distribution that sums to 1 ± ε."""
    stored = torch.cat([topk_logprobs.to(dtype), tail_logprob.to(dtype)[:, None]], dim=-1)  # (n, K + 1)
    return F.log_softmax(stored, dim=-1).clamp(min=torch.finfo(dtype).min)


def _topk_chunk_sums(student_logits: Tensor, teacher: tuple[Tensor, Tensor, Tensor], labels: Tensor,
                     divergence: str, temperature: float, beta: float, dtype: torch.dtype) -> Tensor:
    """(n, V), ((n, K), (n, K), (n,)), (n,) -> (2,): the chunk's summed cross-entropy and summed divergence."""
    topk_ids, topk_logprobs, tail_logprob = teacher
    ce, log_p_s = student_log_probs(student_logits, labels, temperature, dtype)
    student = coarsened_log_probs(log_p_s, topk_ids.long())  # (n, K + 1)
    teacher_lp = teacher_log_probs(topk_logprobs, tail_logprob, dtype)  # (n, K + 1)
    return torch.stack([ce, divergence_from_log_probs(student, teacher_lp, divergence, beta).sum()])


def topk_kd_loss(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor,
                 labels: Tensor, *, divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5,
                 beta: float = 0.5, ignore_index: int = -100, chunk_size: Optional[int] = None,
                 reduction: str = "mean", vocab_size: Optional[int] = None) -> tuple[Tensor, KDStats]:
    """``kd_loss`` with the teacher given by its top-k log-probabilities and tail mass (see the module docstring).

    Per unmasked token t, ``loss_t = alpha · CE_t + (1 − alpha) · T² · D_t(teacher_K+1 ‖ student_K+1)``. The
    teacher's values are taken as already computed at temperature T (a cache records the temperature it was
    built at; the caller checks it); the student's logits are divided by T here. Normalisation, masking,
    chunking (``chunk_size``, gradients computed chunk by chunk in forward) and the stats are those of
    ``kd_loss``; with K = V the two losses are equal.

    Args:
        student_logits: (B, T, Vs) student logits, any float dtype (upcast chunk by chunk).
        topk_ids: (B, T, K) integer ids of the teacher's K most likely tokens (any integer dtype); rows of
            masked positions are ignored.
        topk_logprobs: (B, T, K) the teacher's log-probabilities of those tokens at temperature T.
        tail_logprob: (B, T) the teacher's log of the remaining mass, log(1 − Σ_k p_T(k)).
        labels: (B, T) target ids, ``ignore_index`` for masked positions (the caller shifts).
        divergence, temperature, alpha, beta, ignore_index, chunk_size, reduction: as in ``kd_loss``.
        vocab_size: real vocabulary size: the student's padding logits beyond it are dropped, and every
            teacher id must be below it.

    Returns:
        The scalar fp32 loss and ``KDStats`` (``divergence`` is the coarsened divergence, without T²).

    Raises:
        ValueError: for an invalid argument, mismatched shapes, or a teacher id outside the student's
            vocabulary.
    """
    check_kd_args(divergence, temperature, beta, alpha, reduction, chunk_size)
    if not (student_logits.shape[:-1] == topk_ids.shape[:-1] == tail_logprob.shape == labels.shape
            and topk_ids.shape == topk_logprobs.shape):
        raise ValueError(f"student_logits {tuple(student_logits.shape)}, topk_ids {tuple(topk_ids.shape)}, "
                         f"topk_logprobs {tuple(topk_logprobs.shape)}, tail_logprob {tuple(tail_logprob.shape)} "
                         f"and labels {tuple(labels.shape)} must share the leading (B, T) shape, and the ids and "
                         "log-probs the same K")
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    mask = labels != ignore_index
    if mask.any() and int(topk_ids[mask].max()) >= student_logits.shape[-1]:
        raise ValueError(f"teacher top-k id {int(topk_ids[mask].max())} is outside the student's "
                         f"{student_logits.shape[-1]} logits: the teacher's vocabulary is not the student's")
    dtype = compute_dtype(student_logits)
    chunk_sums = partial(_topk_chunk_sums, divergence=divergence, temperature=temperature, beta=beta, dtype=dtype)
    teacher = (topk_ids, topk_logprobs.detach(), tail_logprob.detach())
    return reduce_kd(student_logits, teacher, labels, chunk_sums, alpha=alpha, temperature=temperature,
                     ignore_index=ignore_index, chunk_size=chunk_size, reduction=reduction, dtype=dtype)
