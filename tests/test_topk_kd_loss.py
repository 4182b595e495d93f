"""Top-k-plus-tail distillation loss: against the full-vocabulary loss, the chain rule of KL, a naive float64
implementation of the coarsened distributions, and its properties."""

import math

import pytest
import torch
from torch.testing import assert_close
from test_kd_losses import BETAS, naive_divergence, naive_softmax, random_batch

from lit_distill.losses import DIVERGENCES, kd_loss, topk_kd_loss
from lit_distill.losses.topk_kd import coarsened_log_probs, teacher_log_probs


def teacher_topk(teacher_logits, k, temperature=1.0):
    """What a cache stores: the top-k log-probs at T, their ids and the exact tail log-mass."""
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    values, ids = log_p.topk(k, dim=-1)
    if k == log_p.shape[-1]:  # no tail: a vanishing mass
        return ids, values, torch.full(values.shape[:-1], -1e300, dtype=torch.float64)
    return ids, values, torch.log1p(-values.exp().sum(-1))


def naive_topk_divergence(student_row, ids, teacher_values, teacher_tail, divergence, temperature, beta):
    """Coarsen both distributions by hand (python floats), then the naive divergence on the (K + 1) outcomes."""
    p_s = naive_softmax(student_row, temperature)
    lumped_s = [p_s[i] for i in ids] + [1.0 - sum(p_s[i] for i in ids)]
    lumped_t = [math.exp(v) for v in teacher_values] + [math.exp(teacher_tail)]
    total = sum(lumped_t)
    lumped_t = [p / total for p in lumped_t]
    # naive_divergence takes logits: log-probs are logits of the same distribution (at temperature 1).
    to_logits = lambda probs: [math.log(max(p, 1e-300)) for p in probs]  # noqa: E731
    return naive_divergence(to_logits(lumped_s), to_logits(lumped_t), divergence, 1.0, beta)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_k_equal_to_vocab_is_the_full_vocabulary_loss(divergence, temperature, chunk_size):
    student, teacher, labels = random_batch(0)
    student = student.double().requires_grad_(True)
    ids, values, tail = teacher_topk(teacher, k=teacher.shape[-1], temperature=temperature)
    args = dict(divergence=divergence, temperature=temperature, alpha=0.3, beta=BETAS[divergence])
    full, full_stats = kd_loss(student, teacher.double(), labels, **args)
    (full_grad,) = torch.autograd.grad(full, student)
    topk, topk_stats = topk_kd_loss(student, ids, values, tail, labels, chunk_size=chunk_size, **args)
    (topk_grad,) = torch.autograd.grad(topk, student)
    assert_close(topk, full, rtol=1e-10, atol=1e-12)
    assert_close(topk_grad, full_grad, rtol=1e-9, atol=1e-12)
    assert_close(topk_stats.divergence, full_stats.divergence, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_against_naive_coarsened_distributions(divergence):
    student, teacher, labels = random_batch(1, vocab=9)
    temperature, alpha, k = 1.5, 0.4, 3
    ids, values, tail = teacher_topk(teacher, k, temperature)
    loss, stats = topk_kd_loss(student.double(), ids, values, tail, labels, divergence=divergence,
                               temperature=temperature, alpha=alpha, beta=BETAS[divergence], reduction="sum")
    expected = divergence_sum = 0.0
    for b, t in zip(*torch.nonzero(labels != -100, as_tuple=True)):
        row = student[b, t].double().tolist()
        d = naive_topk_divergence(row, ids[b, t].tolist(), values[b, t].tolist(), float(tail[b, t]), divergence,
                                  temperature, BETAS[divergence])
        ce = -math.log(naive_softmax(row)[int(labels[b, t])])
        expected += alpha * ce + (1 - alpha) * temperature ** 2 * d
        divergence_sum += d
    assert_close(loss.item(), expected, rtol=1e-9, atol=1e-12)
    assert_close(stats.divergence.item() * int(stats.num_tokens), divergence_sum, rtol=1e-9, atol=1e-12)


def test_hand_value_two_of_four_tokens():
    # Teacher p = [0.5, 0.3, 0.1, 0.1], top-2 ids [0, 1], tail 0.2; student q = [0.25, 0.25, 0.25, 0.25].
    # Coarsened forward KL = 0.5 ln(0.5/0.25) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.5).
    expected = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4)
    student = torch.zeros(1, 1, 4, dtype=torch.float64)
    ids = torch.tensor([[[0, 1]]])
    values = torch.tensor([[[0.5, 0.3]]], dtype=torch.float64).log()
    tail = torch.tensor([[0.2]], dtype=torch.float64).log()
    loss, stats = topk_kd_loss(student, ids, values, tail, torch.tensor([[2]]), alpha=0.0)
    assert_close(loss.item(), expected, rtol=1e-12, atol=0)
    assert_close(stats.ce.item(), math.log(4), rtol=1e-12, atol=0)


def test_chain_rule_gives_the_exact_gap_to_the_full_kl():
    """KL(p‖q) = KL_coarse(p‖q) + p(tail) · KL(p(·|tail) ‖ q(·|tail)): the bias of the top-k loss, exactly."""
    student, teacher, labels = random_batch(2, vocab=12, masked=())
    k = 4
    ids, values, tail = teacher_topk(teacher, k)
    _, full = kd_loss(student.double(), teacher.double(), labels, alpha=0.0, reduction="sum")
    _, coarse = topk_kd_loss(student.double(), ids, values, tail, labels, alpha=0.0, reduction="sum")
    log_p, log_q = torch.log_softmax(teacher.double(), -1), torch.log_softmax(student.double(), -1)
    outside = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, ids, False)  # (B, T, V)
    p_tail = (log_p.exp() * outside).sum(-1)
    conditional_p = torch.where(outside, log_p.exp() / p_tail[..., None], 0.0)
    conditional_q = torch.where(outside, log_q.exp() / (log_q.exp() * outside).sum(-1, keepdim=True), 1.0)
    tail_kl = (conditional_p * (conditional_p.clamp(min=1e-300).log() - conditional_q.log())).sum(-1)
    gap = (p_tail * tail_kl).mean()
    assert gap > 1e-3  # a real gap, not a vacuous identity
    assert_close(full.divergence - coarse.divergence, gap, rtol=1e-9, atol=1e-12)


def test_zero_when_the_student_is_the_teacher_and_never_above_the_full_forward_kl():
    student, teacher, labels = random_batch(3, vocab=10)
    ids, values, tail = teacher_topk(student, 3)
    same, _ = topk_kd_loss(student.double(), ids, values, tail, labels, alpha=0.0)
    assert abs(same.item()) < 1e-12
    ids, values, tail = teacher_topk(teacher, 3)
    coarse, _ = topk_kd_loss(student.double(), ids, values, tail, labels, alpha=0.0)
    full, _ = kd_loss(student.double(), teacher.double(), labels, alpha=0.0)
    assert 0 < coarse.item() < full.item()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_equals_unchunked_in_fp32_with_padded_vocab(divergence):
    student, teacher, labels = random_batch(4, batch=3, time=6, vocab=11)
    padded = torch.cat([student, torch.randn(3, 6, 5)], dim=-1).requires_grad_(True)  # 5 padding logits
    ids, values, tail = teacher_topk(teacher, 4)
    args = dict(divergence=divergence, beta=BETAS[divergence], temperature=1.3, vocab_size=11)
    whole, _ = topk_kd_loss(padded, ids, values.half(), tail.float(), labels, **args)
    (whole_grad,) = torch.autograd.grad(whole, padded)
    chunked, _ = topk_kd_loss(padded, ids, values.half(), tail.float(), labels, chunk_size=4, **args)
    (chunked_grad,) = torch.autograd.grad(chunked, padded)
    assert whole.dtype == torch.float32
    assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    assert_close(chunked_grad, whole_grad, rtol=1e-6, atol=1e-8)
    assert torch.all(whole_grad[..., 11:] == 0)


def test_gradcheck():
    student, teacher, labels = random_batch(5, vocab=6)
    ids, values, tail = teacher_topk(teacher, 2)
    student = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: topk_kd_loss(s, ids, values, tail, labels, divergence="jsd", beta=0.3, chunk_size=2)[0],
        (student,))


def test_all_masked_batch_is_zero_and_attached():
    student, teacher, labels = random_batch(6)
    ids, values, tail = teacher_topk(teacher, 2)
    student.requires_grad_(True)
    loss, stats = topk_kd_loss(student, ids, values, tail, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0 and int(stats.num_tokens) == 0 and torch.all(student.grad == 0)


def test_stored_values_are_renormalised_and_coarsening_sums_to_one():
    log_p = torch.log_softmax(torch.randn(5, 20, dtype=torch.float64), -1)
    ids = log_p.topk(6, -1).indices
    assert_close(coarsened_log_probs(log_p, ids).exp().sum(-1), torch.ones(5, dtype=torch.float64))
    values, tail = log_p.gather(-1, ids), torch.log1p(-log_p.gather(-1, ids).exp().sum(-1))
    rounded = teacher_log_probs(values.half(), tail.float(), torch.float32)
    assert_close(rounded.exp().sum(-1), torch.ones(5))
    assert_close(rounded, torch.cat([values, tail[:, None]], -1).float(), rtol=0, atol=2e-3)


def test_errors_name_the_problem():
    student, teacher, labels = random_batch(7, vocab=5)
    ids, values, tail = teacher_topk(teacher, 2)
    with pytest.raises(ValueError, match="outside the student's 5 logits"):
        topk_kd_loss(student, ids + 4, values, tail, labels)
    with pytest.raises(ValueError, match="same K"):
        topk_kd_loss(student, ids, values[..., :1], tail, labels)
    with pytest.raises(ValueError, match="alpha"):
        topk_kd_loss(student, ids, values, tail, labels, alpha=2.0)
