"""Distillation across tokenizers: a teacher whose vocabulary differs from the student's.

Shapes: N labelled student positions, A aligned positions (A <= N), Vs / Vt student / teacher vocab.

Alignment (``span_starts``): both models read the same text, tokenized differently. A character offset where a
student token and a teacher token both end is a shared boundary; the tokens right after it start an aligned span,
and the two models' next-token distributions there condition on the same text prefix (as TRL GOLD's byte-offset
groups and the ULD paper's answer alignment). Only those A positions are compared; CE covers all N.

Two comparisons of the aligned distributions p_S (over Vs) and p_T (over Vt), both at temperature T:

* ``uld``: Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal
  Logit Distillation Loss for LLMs", eq. 5): the closed-form 1-D Wasserstein distance with uniform cost between the
  probability vectors sorted in decreasing order, the shorter one zero-padded:
  ``ULD = Σ_i |p_S^(i) − p_T^(i)|``, with ``p^(i)`` the i-th largest probability (TRL GOLD's ``ULDLoss``).
* ``vocab_map``: the teacher's distribution mapped onto the student's vocabulary through tokens with the same string
  (the exact-match "EM" token alignment of FuseLLM, Wan et al. 2024, "Knowledge Fusion of Large Language Models",
  §3.3; their MinED relaxes the match to minimum edit distance), renormalised over the matched mass, then
  ``KL(p_T→S ‖ p_S)``. Meaningful when both vocabularies share a string convention (e.g. byte-level BPE's ``Ġ``).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_distill.losses.dtypes import compute_dtype
from lit_distill.losses.kd import REDUCTIONS, student_log_probs

CROSS_TOKENIZER_METHODS = ("uld", "vocab_map")


class CrossTokenizerStats(NamedTuple):
    """Detached diagnostics of one ``cross_tokenizer_loss`` call.

    Attributes:
        divergence: mean ULD distance / mapped KL over the aligned positions, without the T² factor.
        ce: mean hard-label cross-entropy of the student over its N labelled positions (temperature 1).
        num_tokens: N, the labelled student positions (int64 scalar); the loss's "mean" denominator.
        num_aligned: A, the positions that also carry a teacher distribution (int64 scalar).
    """

    divergence: Tensor
    ce: Tensor
    num_tokens: Tensor
    num_aligned: Tensor


def monotone_ends(ends: Sequence[int]) -> list[int]:
    """Character end offsets made non-decreasing by a suffix minimum: the bytes of one character split over several
    byte-level tokens (or decoded one prefix at a time) all end where the character ends."""
    out, low = list(ends), float("inf")
    for i in range(len(out) - 1, -1, -1):
        low = out[i] = min(out[i], low)
    return out


def span_starts(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[tuple[int, int]]:
    """The monotone alignment of two tokenizations of one text: ``(i, j)`` pairs such that student token i and
    teacher token j are the first tokens after a shared boundary (text start, or a character offset where a token
    of each side ends). Tokens of one side between two consecutive pairs cover the same characters as the other's.

    Args:
        student_ends, teacher_ends: each token's character end offset, non-decreasing (``monotone_ends``);
            zero-width tokens (specials) end where the previous token does and join the following span.

    Returns:
        Pairs in increasing order of both i and j, every i < len(student_ends) and j < len(teacher_ends).
    """
    boundaries = sorted({0} | (set(student_ends) & set(teacher_ends)))
    pairs = [(bisect_right(student_ends, e), bisect_right(teacher_ends, e)) for e in boundaries]
    return [(i, j) for i, j in pairs if i < len(student_ends) and j < len(teacher_ends)]


def uld_distance(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                 top_k: Optional[int] = None) -> Tensor:
    """ULD per position: L1 distance between the sorted probability vectors (Boizard et al. 2024, eq. 5).

    Sorting is O(V log V) per position; ``top_k`` keeps only each side's k largest probabilities (``torch.topk``)
    plus the difference of their tail masses, ``Σ_{i<k} |p_S^(i) − p_T^(i)| + |tail_S − tail_T|``: a lower bound of
    the full distance (triangle inequality over the tail) that is exact once k >= max(Vs, Vt), and close to it for
    peaked LM distributions, whose tails are flat.

    Args:
        student_logits: (A, Vs) student logits.
        teacher_logits: (A, Vt) teacher logits; detached here.
        temperature: T > 0 dividing both logits.
        top_k: probabilities kept per side; None sorts the whole vocabularies.

    Returns:
        (A,) distances in [0, 2], fp32 (float64 for float64 inputs).
    """
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same number of (aligned) rows")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    dtype = compute_dtype(student_logits, teacher_logits)
    p_s = F.softmax(student_logits.to(dtype) / temperature, dim=-1)  # (A, Vs)
    p_t = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # (A, Vt)
    width = max(p_s.shape[-1], p_t.shape[-1]) if top_k is None else top_k

    def sorted_head(p: Tensor) -> Tensor:  # (A, V) -> (A, width): largest first, zero-padded
        head = p.topk(min(width, p.shape[-1]), dim=-1).values
        return F.pad(head, (0, width - head.shape[-1]))

    head_s, head_t = sorted_head(p_s), sorted_head(p_t)  # (A, width)
    tail = ((1 - head_s.sum(-1)) - (1 - head_t.sum(-1))).abs() if top_k is not None else 0.0  # (A,)
    return (head_s - head_t).abs().sum(-1) + tail


def build_vocab_map(student_vocab: dict[str, int], teacher_vocab: dict[str, int], teacher_size: int) -> Tensor:
    """(Vt,) int64: for each teacher id the student id of the token with the same string, −1 where none (FuseLLM's
    exact-match alignment). ``teacher_size`` is the teacher's logit width (ids past its tokenizer stay −1)."""
    mapping = torch.full((teacher_size,), -1, dtype=torch.long)
    for token, teacher_id in teacher_vocab.items():
        if token in student_vocab and teacher_id < teacher_size:
            mapping[teacher_id] = student_vocab[token]
    return mapping


def build_first_token_map(student_tokenizer, teacher_tokenizer, teacher_size: int) -> Tensor:
    """(Vt,) int64: for each teacher id the first student token of the teacher token's text, −1 for special tokens,
    ids past the tokenizer and texts that are not whole characters (a byte-level piece of one).

    Every other teacher token maps somewhere, so no teacher mass is dropped: at an aligned position the teacher's
    probability of a longer token (" theory") goes to the token the student would start that text with (" the"),
    the student's own next token. Exact match (``build_vocab_map``) keeps only tokens both vocabularies share.
    """
    size = min(len(teacher_tokenizer), teacher_size)
    texts = teacher_tokenizer.batch_decode([[i] for i in range(size)], clean_up_tokenization_spaces=False)
    first_ids = student_tokenizer(texts, add_special_tokens=False)["input_ids"]
    special = set(teacher_tokenizer.all_special_ids)
    mapping = torch.full((teacher_size,), -1, dtype=torch.long)
    for teacher_id, (text, ids) in enumerate(zip(texts, first_ids)):
        if ids and teacher_id not in special and "\ufffd" not in text:
            mapping[teacher_id] = ids[0]
    return mapping


def mapped_teacher_probs(teacher_logits: Tensor, vocab_map: Tensor, student_vocab: int,
                         temperature: float = 1.0) -> Tensor:
    """(A, Vt), (Vt,) -> (A, Vs): the teacher's probabilities moved to the student ids of ``vocab_map``, unmatched
    mass dropped and the rest renormalised (a row with no matched mass stays all zero and then costs nothing)."""
    dtype = compute_dtype(teacher_logits)
    p_t = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # (A, Vt)
    matched = vocab_map >= 0  # (Vt,)
    mapped = p_t.new_zeros(p_t.shape[0], student_vocab).index_add_(1, vocab_map[matched], p_t[:, matched])  # (A, Vs)
    return mapped / mapped.sum(-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)


def vocab_map_kl(student_logits: Tensor, teacher_logits: Tensor, vocab_map: Tensor,
                 temperature: float = 1.0) -> Tensor:
    """(A, Vs), (A, Vt), (Vt,) -> (A,): ``KL(p_T→S ‖ p_S) = Σ_v q_v (log q_v − log p_S(v))`` with q the mapped teacher
    distribution of ``mapped_teacher_probs`` (0 log 0 = 0)."""
    dtype = compute_dtype(student_logits, teacher_logits)
    q = mapped_teacher_probs(teacher_logits, vocab_map, student_logits.shape[-1], temperature).to(dtype)  # (A, Vs)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (A, Vs)
    return (torch.xlogy(q, q) - q * log_p_s).sum(-1)


def cross_tokenizer_loss(student_logits: Tensor, labels: Tensor, aligned: Tensor, teacher_logits: Tensor, *,
                         method: str = "uld", temperature: float = 1.0, alpha: float = 0.5,
                         top_k: Optional[int] = None, vocab_map: Optional[Tensor] = None,
                         reduction: str = "mean") -> tuple[Tensor, CrossTokenizerStats]:
    """``alpha · Σ_N CE + (1 − alpha) · T² · Σ_A D``, divided by N for ``mean``: the divergence of an unaligned
    position counts as 0, so both terms share the student's token count (and a step's normalisation, as ``kd_loss``).

    Args:
        student_logits: (N, Vs) student logits at its labelled positions.
        labels: (N,) the student's target ids.
        aligned: (A,) int64 rows of ``student_logits`` that carry a teacher distribution (``span_starts``).
        teacher_logits: (A, Vt) the teacher's logits at the same positions, row a aligned with ``aligned[a]``.
        method: one of ``CROSS_TOKENIZER_METHODS``.
        temperature: T > 0 of the divergence (CE stays at temperature 1).
        alpha: weight in [0, 1] of the cross-entropy.
        top_k: ``uld_distance``'s truncation; ignored by ``vocab_map``.
        vocab_map: (Vt,) teacher-to-student ids (``build_vocab_map``); needed by ``vocab_map``.
        reduction: ``"mean"`` over the N labelled positions or ``"sum"``.

    Returns:
        The scalar loss (0, attached to the graph, when N = 0) and ``CrossTokenizerStats``.
    """
    if method not in CROSS_TOKENIZER_METHODS:
        raise ValueError(f"method must be one of {CROSS_TOKENIZER_METHODS}, got {method!r}")
    if method == "vocab_map" and vocab_map is None:
        raise ValueError("method 'vocab_map' needs vocab_map (build_vocab_map of the two tokenizers' vocabularies)")
    if not temperature > 0 or not 0.0 <= alpha <= 1.0 or reduction not in REDUCTIONS:
        raise ValueError(f"expected temperature > 0, alpha in [0, 1] and reduction in {REDUCTIONS}; got "
                         f"temperature={temperature}, alpha={alpha}, reduction={reduction!r}")
    if labels.shape != student_logits.shape[:1] or aligned.shape != teacher_logits.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (N,) of student_logits {tuple(student_logits.shape)}"
                         f" and aligned {tuple(aligned.shape)} (A,) of teacher_logits {tuple(teacher_logits.shape)}")
    dtype = compute_dtype(student_logits, teacher_logits)
    ce_sum, _ = student_log_probs(student_logits, labels, 1.0, dtype)
    student_aligned = student_logits[aligned]  # (A, Vs)
    if method == "uld":
        divergence = uld_distance(student_aligned, teacher_logits, temperature, top_k)  # (A,)
    else:
        divergence = vocab_map_kl(student_aligned, teacher_logits, vocab_map.to(teacher_logits.device), temperature)
    loss = alpha * ce_sum + (1.0 - alpha) * temperature ** 2 * divergence.sum()
    num_tokens, num_aligned = torch.tensor(labels.numel()), torch.tensor(aligned.numel())
    if reduction == "mean":
        loss = loss / num_tokens.clamp(min=1)
    stats = CrossTokenizerStats(divergence=divergence.detach().sum() / num_aligned.clamp(min=1),
                                ce=ce_sum.detach() / num_tokens.clamp(min=1), num_tokens=num_tokens,
                                num_aligned=num_aligned)
    return loss, stats
