"""Distillation losses against hand-derived values and naive float64 reference implementations."""

import math
import weakref

import pytest
import torch
from torch.testing import assert_close

from lit_distill.losses import DIVERGENCES, KDStats, align_vocab, kd_loss, token_divergence

BETAS = {"forward_kl": 0.5, "reverse_kl": 0.5, "jsd": 0.3, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.25,
         "tvd": 0.5}


# ---- naive references: python loops, explicit probabilities, float64 -----------------------------------------
def naive_softmax(row, temperature=1.0):
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    return [e / sum(exps) for e in exps]


def naive_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def naive_divergence(student_row, teacher_row, divergence, temperature, beta):
    p_s, p_t = naive_softmax(student_row, temperature), naive_softmax(teacher_row, temperature)
    if divergence == "forward_kl":
        return naive_kl(p_t, p_s)
    if divergence == "reverse_kl":
        return naive_kl(p_s, p_t)
    if divergence == "jsd":
        m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)]
        return beta * naive_kl(p_t, m) + (1 - beta) * naive_kl(p_s, m)
    if divergence == "skew_forward_kl":
        return naive_kl(p_t, [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)])
    if divergence == "skew_reverse_kl":
        return naive_kl(p_s, [beta * s + (1 - beta) * t for s, t in zip(p_s, p_t)])
    assert divergence == "tvd"
    return 0.5 * sum(abs(t - s) for s, t in zip(p_s, p_t))


def naive_kd(student, teacher, labels, divergence, temperature, alpha, beta, reduction, ignore_index=-100):
    """Returns (loss, mean divergence, mean ce, token count) by looping over (b, t)."""
    total = divergence_total = ce_total = 0.0
    count = 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            if label == ignore_index:
                continue
            s_row, t_row = student[b, t].double().tolist(), teacher[b, t].double().tolist()
            ce = -math.log(naive_softmax(s_row)[label])
            d = naive_divergence(s_row, t_row, divergence, temperature, beta)
            total += alpha * ce + (1 - alpha) * temperature ** 2 * d
            divergence_total, ce_total, count = divergence_total + d, ce_total + ce, count + 1
    loss = total / count if reduction == "mean" else total
    return loss, divergence_total / count, ce_total / count, count


def random_batch(seed, batch=2, time=5, vocab=7, masked=((0, 0), (0, 3), (1, 4)), scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, time, vocab, generator=generator)
    teacher = scale * torch.randn(batch, time, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    for b, t in masked:
        labels[b, t] = -100
    return student, teacher, labels


# ---- hand-derived values ------------------------------------------------------------------------------------
# Two tokens over a 3-word vocabulary, probabilities chosen so the divergences have closed forms.
P_T = [[1 / 2, 1 / 4, 1 / 4], [0.8, 0.1, 0.1]]
P_S = [[1 / 4, 1 / 2, 1 / 4], [0.4, 0.4, 0.2]]
LN2 = math.log(2)
# m = 0.25 p_T + 0.75 p_S (jsd and skew_forward_kl at beta 0.25): [5/16, 7/16, 1/4] and [0.5, 0.325, 0.175]
# m' = 0.25 p_S + 0.75 p_T (skew_reverse_kl at beta 0.25): [7/16, 5/16, 1/4] and [0.7, 0.175, 0.125]
HAND = {
    ("forward_kl", 0.5): [1 / 2 * LN2 - 1 / 4 * LN2,  # 1/2 ln(2) + 1/4 ln(1/2) + 0
                          0.8 * LN2 + 0.1 * math.log(1 / 4) + 0.1 * math.log(1 / 2)],
    ("reverse_kl", 0.5): [1 / 4 * math.log(1 / 2) + 1 / 2 * LN2,
                          0.4 * math.log(1 / 2) + 0.4 * math.log(4) + 0.2 * LN2],
    ("jsd", 0.25): [
        0.25 * (1 / 2 * math.log(8 / 5) + 1 / 4 * math.log(4 / 7))
        + 0.75 * (1 / 4 * math.log(4 / 5) + 1 / 2 * math.log(8 / 7)),
        0.25 * (0.8 * math.log(0.8 / 0.5) + 0.1 * math.log(0.1 / 0.325) + 0.1 * math.log(0.1 / 0.175))
        + 0.75 * (0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.325) + 0.2 * math.log(0.2 / 0.175))],
    ("skew_forward_kl", 0.25): [1 / 2 * math.log(8 / 5) + 1 / 4 * math.log(4 / 7),
                                0.8 * math.log(0.8 / 0.5) + 0.1 * math.log(0.1 / 0.325)
                                + 0.1 * math.log(0.1 / 0.175)],
    ("skew_reverse_kl", 0.25): [1 / 4 * math.log(4 / 7) + 1 / 2 * math.log(8 / 5),
                                0.4 * math.log(0.4 / 0.7) + 0.4 * math.log(0.4 / 0.175)
                                + 0.2 * math.log(0.2 / 0.125)],
    ("tvd", 0.5): [0.5 * (1 / 4 + 1 / 4 + 0), 0.5 * (0.4 + 0.3 + 0.1)],
}


def test_hand_values_cover_every_divergence():
    assert sorted(d for d, _ in HAND) == sorted(DIVERGENCES)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence, beta", list(HAND))
def test_divergence_hand_values(divergence, beta, temperature):
    # Logits T·log p give softmax(logits / T) = p, so the hand values hold at every temperature.
    student = temperature * torch.tensor(P_S).log()  # (2, 3)
    teacher = temperature * torch.tensor(P_T).log()
    out = token_divergence(student, teacher, divergence, temperature=temperature, beta=beta)
    assert out.shape == (2,) and out.dtype == torch.float32
    assert_close(out, torch.tensor(HAND[divergence, beta]), rtol=1e-5, atol=1e-6)


def test_kd_loss_hand_value():
    student, teacher = torch.tensor(P_S).log()[None], torch.tensor(P_T).log()[None]  # (1, 2, 3)
    labels = torch.tensor([[0, 2]])
    loss, stats = kd_loss(student, teacher, labels, divergence="forward_kl", temperature=1.0, alpha=0.25)
    ce = [-math.log(1 / 4), -math.log(0.2)]
    kl = HAND["forward_kl", 0.5]
    expected = sum(0.25 * c + 0.75 * d for c, d in zip(ce, kl)) / 2
    assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert_close(stats.ce, torch.tensor(sum(ce) / 2), rtol=1e-6, atol=1e-6)
    assert_close(stats.divergence, torch.tensor(sum(kl) / 2), rtol=1e-6, atol=1e-6)


# ---- naive references on random logits ----------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_token_divergence_matches_naive(divergence, temperature):
    student, teacher, _ = random_batch(seed=1)
    student, teacher = student.flatten(0, 1), teacher.flatten(0, 1)  # (N, V)
    beta = BETAS[divergence]
    out = token_divergence(student, teacher, divergence, temperature=temperature, beta=beta)
    expected = [naive_divergence(s.tolist(), t.tolist(), divergence, temperature, beta)
                for s, t in zip(student.double(), teacher.double())]
    assert_close(out, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_divergence_matches_naive(divergence, temperature):
    student, teacher, labels = random_batch(seed=2)
    loss, stats = kd_loss(student, teacher, labels, divergence=divergence, temperature=temperature, alpha=0.0,
                          beta=BETAS[divergence])
    _, divergence_mean, ce_mean, count = naive_kd(student, teacher, labels, divergence, temperature, 0.0,
                                                  BETAS[divergence], "mean")
    assert stats.num_tokens.dtype == torch.int64 and int(stats.num_tokens) == count == 7
    assert_close(stats.divergence, torch.tensor(divergence_mean, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert_close(stats.ce, torch.tensor(ce_mean, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert_close(loss, torch.tensor(temperature ** 2 * divergence_mean, dtype=torch.float32),
                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_matches_naive(divergence, reduction):
    student, teacher, labels = random_batch(seed=3)
    loss, stats = kd_loss(student, teacher, labels, divergence=divergence, temperature=2.0, alpha=0.3,
                          beta=BETAS[divergence], reduction=reduction)
    expected, divergence_mean, ce_mean, _ = naive_kd(student, teacher, labels, divergence, 2.0, 0.3,
                                                     BETAS[divergence], reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    # Stats are per-token means whatever the reduction, and detached.
    assert_close(stats.divergence, torch.tensor(divergence_mean, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert_close(stats.ce, torch.tensor(ce_mean, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_stats_are_detached_and_teacher_gets_no_gradient():
    student, teacher, labels = random_batch(seed=4)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss, stats = kd_loss(student, teacher, labels, divergence="jsd", chunk_size=3)
    assert isinstance(stats, KDStats)
    assert not any(value.requires_grad for value in stats)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


# ---- gradients ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_token_divergence_gradcheck(divergence):
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(
        lambda s: token_divergence(s, teacher, divergence, temperature=1.5, beta=BETAS[divergence]), (student,))


def test_kd_loss_gradcheck_chunked():
    # Through masking, vocab truncation, gradient-in-forward chunks and the mixture; per-divergence checks above.
    student, teacher, labels = random_batch(seed=6, time=3, vocab=4, masked=((1, 1),))
    student = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: kd_loss(s, teacher.double()[..., :3], labels.clamp(max=2), divergence="jsd", temperature=2.0,
                          alpha=0.4, beta=0.3, chunk_size=2, vocab_size=3)[0], (student,))


# ---- chunking -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12, 100])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl", "tvd"])
def test_chunked_equals_full(divergence, chunk_size):
    student, teacher, labels = random_batch(seed=7, batch=2, time=8, vocab=11,
                                            masked=((0, 1), (0, 6), (1, 0), (1, 7)))  # 12 unmasked tokens
    results = []
    for chunk in (None, chunk_size):
        leaf = student.clone().requires_grad_(True)
        loss, stats = kd_loss(leaf, teacher, labels, divergence=divergence, temperature=2.0, alpha=0.3,
                              beta=BETAS[divergence], chunk_size=chunk, reduction="sum")
        loss.backward()
        results.append((loss.detach(), stats, leaf.grad))
    (full_loss, full_stats, full_grad), (chunk_loss, chunk_stats, chunk_grad) = results
    assert_close(chunk_loss, full_loss, rtol=1e-6, atol=1e-6)
    for chunk_value, full_value in zip(chunk_stats, full_stats):
        assert_close(chunk_value, full_value, rtol=1e-6, atol=1e-6)
    assert_close(chunk_grad, full_grad, rtol=1e-6, atol=1e-7)
    assert full_grad[0, 1].abs().sum() == 0 and full_grad[0, 0].abs().sum() > 0  # masked rows get no gradient


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gathered_rows_equal_the_masked_batch(chunk_size):
    """(N, V) rows gathered at the labelled positions (what DistillModule passes) give the (B, T, V) loss."""
    student, teacher, labels = random_batch(seed=9, batch=2, time=6, vocab=7, masked=((0, 2), (1, 5)))
    mask = labels != -100
    results = []
    for leaf, teacher_rows, label_rows in ((student.clone().requires_grad_(True), teacher, labels),
                                           (student[mask].clone().requires_grad_(True), teacher[mask], labels[mask])):
        loss, stats = kd_loss(leaf, teacher_rows, label_rows, divergence="jsd", temperature=2.0, alpha=0.3,
                              chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), stats.num_tokens, leaf.grad))
    (batch_loss, batch_tokens, batch_grad), (row_loss, row_tokens, row_grad) = results
    assert_close(row_loss, batch_loss, rtol=1e-6, atol=1e-7)
    assert row_tokens == batch_tokens == 10
    assert_close(row_grad, batch_grad[mask], rtol=1e-6, atol=1e-7)


def _saved_for_backward(chunk_size, dtype):
    """(shape, dtype) of every floating tensor still saved for backward once the forward pass is over (the
    per-chunk graphs built inside the chunked forward are gone by then)."""
    student, teacher, labels = random_batch(seed=8, batch=2, time=12, vocab=16, masked=((0, 3),))
    saved = []

    def pack(tensor):
        if tensor.is_floating_point():
            saved.append(weakref.ref(tensor))
        return tensor

    leaf = student.to(dtype).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = kd_loss(leaf, teacher.to(dtype), labels, divergence="jsd", temperature=2.0, chunk_size=chunk_size)
    alive = [(tuple(ref().shape), ref().dtype) for ref in saved if ref() is not None]
    loss.backward()
    assert torch.isfinite(leaf.grad).all()
    return alive


def test_chunked_backward_keeps_only_the_precomputed_gradient():
    # Unchunked, backward keeps several fp32 (N, V) intermediates; chunked, only the student-dtype gradient buffer.
    full = _saved_for_backward(None, torch.bfloat16)
    assert any(shape == (23, 16) and dtype == torch.float32 for shape, dtype in full)
    assert _saved_for_backward(5, torch.bfloat16) == [((2, 12, 16), torch.bfloat16)]


def test_checkpoint_skipped_without_grad():
    student, teacher, labels = random_batch(seed=9)
    with torch.no_grad():
        loss, _ = kd_loss(student, teacher, labels, chunk_size=2)
    assert_close(loss, kd_loss(student, teacher, labels)[0], rtol=1e-6, atol=1e-6)


# ---- properties ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_of_identical_distributions_is_zero(divergence):
    student, _, labels = random_batch(seed=10, scale=5.0)
    out = token_divergence(student, student.clone(), divergence, temperature=2.0, beta=BETAS[divergence])
    assert_close(out, torch.zeros(2, 5), rtol=0, atol=1e-6)
    loss, _ = kd_loss(student, student.clone(), labels, divergence=divergence, alpha=0.0, beta=BETAS[divergence])
    assert_close(loss, torch.tensor(0.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergences_are_nonnegative(divergence):
    student, teacher, _ = random_batch(seed=11, scale=10.0)
    out = token_divergence(student, teacher, divergence, beta=BETAS[divergence])
    assert (out >= -1e-6).all()


def test_jsd_endpoints_are_forward_and_reverse_kl_exactly():
    student, teacher, _ = random_batch(seed=12)
    assert torch.equal(token_divergence(student, teacher, "jsd", beta=0.0),
                       token_divergence(student, teacher, "forward_kl"))
    assert torch.equal(token_divergence(student, teacher, "jsd", beta=1.0),
                       token_divergence(student, teacher, "reverse_kl"))


def test_jsd_interior_vanishes_towards_the_endpoints():
    # JSD(β)/β → KL(p_T ‖ p_S) as β → 0 and JSD(β)/(1 − β) → KL(p_S ‖ p_T) as β → 1: the endpoints are a convention.
    student, teacher, _ = random_batch(seed=13)
    student, teacher = student.double(), teacher.double()
    eps = 1e-6
    assert_close(token_divergence(student, teacher, "jsd", beta=eps) / eps,
                 token_divergence(student, teacher, "forward_kl"), rtol=1e-4, atol=1e-8)
    assert_close(token_divergence(student, teacher, "jsd", beta=1 - eps) / eps,
                 token_divergence(student, teacher, "reverse_kl"), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_bounded_and_swap_symmetric(beta):
    student, teacher, _ = random_batch(seed=14, scale=10.0)  # far-apart distributions approach the bound
    jsd = token_divergence(student, teacher, "jsd", beta=beta)
    swapped = token_divergence(teacher, student, "jsd", beta=1.0 - beta)
    assert_close(jsd, swapped, rtol=1e-5, atol=1e-6)
    if 0.0 < beta < 1.0:
        binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # <= log 2
        assert (jsd >= -1e-6).all() and (jsd <= binary_entropy + 1e-6).all()
        assert jsd.max() > 0.5 * binary_entropy  # the bound is not vacuous for these logits


def test_skew_kl_at_zero_skew_is_plain_kl():
    student, teacher, _ = random_batch(seed=15)
    assert torch.equal(token_divergence(student, teacher, "skew_forward_kl", beta=0.0),
                       token_divergence(student, teacher, "forward_kl"))
    assert torch.equal(token_divergence(student, teacher, "skew_reverse_kl", beta=0.0),
                       token_divergence(student, teacher, "reverse_kl"))


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_squared_scaling(temperature):
    student, teacher, labels = random_batch(seed=16)
    loss, stats = kd_loss(student, teacher, labels, alpha=0.0, temperature=temperature)
    assert_close(loss, temperature ** 2 * stats.divergence, rtol=1e-6, atol=0)
    assert stats.divergence > 0


@pytest.mark.parametrize("divergence", [d for d in DIVERGENCES if d != "reverse_kl"])
def test_negative_infinite_teacher_logits(divergence):
    # A teacher that masks words with -inf puts probability 0 there: finite values, matching the naive terms.
    student, teacher, _ = random_batch(seed=17)
    student, teacher = student.flatten(0, 1), teacher.flatten(0, 1)  # (N, V)
    teacher[:, :2] = -math.inf
    student.requires_grad_(True)
    beta = BETAS[divergence]
    out = token_divergence(student, teacher, divergence, temperature=2.0, beta=beta)
    out.sum().backward()
    assert torch.isfinite(student.grad).all()
    expected = [naive_divergence(s.tolist(), t.tolist(), divergence, 2.0, beta)
                for s, t in zip(student.detach().double(), teacher.double())]
    assert_close(out.detach(), torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_underflowing_probabilities_stay_finite(divergence):
    # exp(-1000) underflows even in float64: mixtures must stay in log space (no log(0)).
    student = torch.tensor([[0.0, -1000.0, -2000.0], [-1000.0, 0.0, -3.0]], requires_grad=True)
    teacher = torch.tensor([[-2000.0, -1000.0, 0.0], [-1000.0, 0.0, -3.0]])
    out = token_divergence(student, teacher, divergence, beta=BETAS[divergence])
    out.sum().backward()
    assert torch.isfinite(out).all() and (out >= -1e-6).all() and torch.isfinite(student.grad).all()
    # Numerically disjoint supports: the first token's values in closed form.
    beta = BETAS[divergence]
    disjoint = {"forward_kl": 2000.0, "reverse_kl": 2000.0, "tvd": 1.0,
                "jsd": -beta * math.log(beta) - (1 - beta) * math.log(1 - beta),
                "skew_forward_kl": -math.log(beta), "skew_reverse_kl": -math.log(beta)}[divergence]
    assert_close(out[0].detach(), torch.tensor(disjoint), rtol=1e-5, atol=1e-6)


# ---- masking, dtypes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_all_masked_batch(chunk_size, reduction):
    student, teacher, labels = random_batch(seed=18)
    labels.fill_(-100)
    student.requires_grad_(True)
    loss, stats = kd_loss(student, teacher, labels, divergence="jsd", chunk_size=chunk_size, reduction=reduction)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert stats.divergence.item() == 0.0 and stats.ce.item() == 0.0
    assert stats.num_tokens.item() == 0 and stats.num_tokens.dtype == torch.int64


@pytest.mark.parametrize("student_dtype, teacher_dtype",
                         [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
                          (torch.float16, torch.float32)])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_low_precision_inputs_give_fp32_loss(student_dtype, teacher_dtype, chunk_size):
    student, teacher, labels = random_batch(seed=19)
    low_student = student.to(student_dtype).requires_grad_(True)
    low_teacher = teacher.to(teacher_dtype)
    loss, stats = kd_loss(low_student, low_teacher, labels, divergence="jsd", temperature=2.0, chunk_size=chunk_size)
    loss.backward()
    assert loss.dtype == stats.divergence.dtype == stats.ce.dtype == torch.float32
    assert low_student.grad.dtype == student_dtype
    # Computed in fp32 from the rounded inputs: equal to the fp32 loss of those exact values...
    reference, _ = kd_loss(low_student.detach().float(), low_teacher.float(), labels, divergence="jsd",
                           temperature=2.0)
    assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    # ...and close to the loss of the unrounded logits.
    assert_close(loss, kd_loss(student, teacher, labels, divergence="jsd", temperature=2.0)[0],
                 rtol=2e-2, atol=2e-2)


def test_float64_inputs_stay_float64():
    student, teacher, labels = random_batch(seed=20)
    loss, _ = kd_loss(student.double(), teacher.double(), labels)
    assert loss.dtype == torch.float64


# ---- vocabulary alignment -----------------------------------------------------------------------------------
def test_align_vocab_truncates_padding_rows():
    student, teacher, labels = random_batch(seed=21, vocab=7)
    padded_teacher = torch.cat([teacher, 50.0 * torch.ones(2, 5, 9)], dim=-1)  # (B, T, 16): huge padding logits
    padded_student = torch.cat([student, torch.full((2, 5, 1), 30.0)], dim=-1)  # (B, T, 8)
    aligned_student, aligned_teacher = align_vocab(padded_student, padded_teacher, vocab_size=7)
    assert torch.equal(aligned_student, student) and torch.equal(aligned_teacher, teacher)
    for divergence in DIVERGENCES:
        padded, _ = kd_loss(padded_student, padded_teacher, labels, divergence=divergence, vocab_size=7)
        unpadded, _ = kd_loss(student, teacher, labels, divergence=divergence)
        assert_close(padded, unpadded, rtol=1e-6, atol=1e-6)


def test_align_vocab_same_size_without_vocab_size_is_identity():
    student, teacher, _ = random_batch(seed=22)
    aligned_student, aligned_teacher = align_vocab(student, teacher, None)
    assert aligned_student is student and aligned_teacher is teacher


@pytest.mark.parametrize("student_vocab, teacher_vocab", [(7, 10), (12, 9)])
def test_align_vocab_too_few_logits_raises(student_vocab, teacher_vocab):
    with pytest.raises(ValueError) as error:
        align_vocab(torch.zeros(2, student_vocab), torch.zeros(2, teacher_vocab), vocab_size=10)
    message = str(error.value)
    assert "vocab_size=10" in message and str(student_vocab) in message and str(teacher_vocab) in message


def test_align_vocab_different_sizes_need_vocab_size():
    with pytest.raises(ValueError, match=r"8.*16.*vocab_size"):
        align_vocab(torch.zeros(2, 8), torch.zeros(2, 16), vocab_size=None)
    with pytest.raises(ValueError, match="vocab_size"):
        kd_loss(torch.zeros(1, 2, 8), torch.zeros(1, 2, 16), torch.zeros(1, 2, dtype=torch.long))


# ---- argument validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"divergence": "kl"}, "divergence"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"reduction": "avg"}, "reduction"),
    ({"divergence": "jsd", "beta": 1.5}, "beta"),
    ({"divergence": "jsd", "beta": -0.5}, "beta"),
    ({"divergence": "skew_forward_kl", "beta": 1.0}, "beta"),
    ({"divergence": "skew_reverse_kl", "beta": -0.1}, "beta"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_arguments_raise(kwargs, name):
    student, teacher, labels = random_batch(seed=23)
    with pytest.raises(ValueError, match=name):
        kd_loss(student, teacher, labels, **kwargs)


def test_unknown_divergence_lists_the_choices():
    with pytest.raises(ValueError, match="reverse_kl") as error:
        token_divergence(torch.zeros(2, 3), torch.zeros(2, 3), "kl")
    assert "'kl'" in str(error.value)


@pytest.mark.parametrize("labels_shape, teacher_shape", [((2, 4), (2, 5, 7)), ((2, 5), (2, 4, 7))])
def test_shape_mismatch_raises(labels_shape, teacher_shape):
    with pytest.raises(ValueError, match=r"labels \(") as error:
        kd_loss(torch.zeros(2, 5, 7), torch.zeros(teacher_shape), torch.zeros(labels_shape, dtype=torch.long))
    assert str(labels_shape) in str(error.value) and str(teacher_shape) in str(error.value)


def test_token_divergence_shape_mismatch_raises():
    with pytest.raises(ValueError, match="align_vocab"):
        token_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


def test_a_bf16_students_chunked_gradient_is_the_fp32_gradient_rounded_once():
    # The mean's 1/N is applied in fp32 inside each chunk: the stored bf16 gradient is rounded once, not twice.
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 16, 257, generator=generator) * 3).to(torch.bfloat16)
    teacher = torch.randn(2, 16, 257, generator=generator) * 3
    labels = torch.randint(0, 257, (2, 16), generator=generator)
    labels[0, :5] = -100
    reference = student.float().requires_grad_(True)
    kd_loss(reference, teacher, labels, temperature=2.0)[0].backward()
    chunked = student.clone().requires_grad_(True)
    kd_loss(chunked, teacher, labels, temperature=2.0, chunk_size=5)[0].backward()
    assert torch.equal(chunked.grad, reference.grad.to(torch.bfloat16))
