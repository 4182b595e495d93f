"""DPO-family and reward-model losses against hand-derived values and a naive python implementation."""

import math

import pytest
import torch
from torch.testing import assert_close

from lit_distill.losses import DPO_LOSS_TYPES, DPOStats, RewardStats, dpo_loss, reward_loss


def softplus(x):
    """−log σ(−x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# ---- naive reference: one pair at a time, python floats ----------------------------------------------------
def naive_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    losses = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - c) - (b - d)
        nll_chosen, nll_rejected = softplus(-beta * h), softplus(beta * h)  # −log σ(βh), −log σ(−βh)
        if loss_type == "sigmoid":
            losses.append((1 - eps) * nll_chosen + eps * nll_rejected)
        elif loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        elif loss_type == "hinge":
            losses.append(max(0.0, 1 - beta * h))
        else:
            losses.append(((1 - eps) * nll_chosen - eps * nll_rejected) / (1 - 2 * eps))
    return losses


# ---- hand-derived example --------------------------------------------------------------------------------
# chosen log-ratios  π_c − ref_c = [-1 + 1.5, -2 + 2, -3 + 2] = [0.5, 0, -1]
# rejected log-ratios π_r − ref_r = [-2 + 1.5, -1 + 2, -3 + 4] = [-0.5, 1, 1]
# h = [1, -1, -2]; with β = 0.5, βh = [0.5, -0.5, -1] and 1/(2β) = 1.
POLICY_CHOSEN = torch.tensor([-1.0, -2.0, -3.0])
POLICY_REJECTED = torch.tensor([-2.0, -1.0, -3.0])
REFERENCE_CHOSEN = torch.tensor([-1.5, -2.0, -2.0])
REFERENCE_REJECTED = torch.tensor([-1.5, -2.0, -4.0])
BETA_H = [0.5, -0.5, -1.0]
HAND = {
    # −log σ(βh) = log(1 + e^{−βh})
    ("sigmoid", 0.0): [softplus(-0.5), softplus(0.5), softplus(1.0)],
    # 0.9 log(1 + e^{−βh}) + 0.1 log(1 + e^{βh})
    ("sigmoid", 0.1): [0.9 * softplus(-x) + 0.1 * softplus(x) for x in BETA_H],
    # (h − 1)² = [0, 4, 9]
    ("ipo", 0.0): [0.0, 4.0, 9.0],
    # max(0, 1 − βh) = [0.5, 1.5, 2]
    ("hinge", 0.0): [0.5, 1.5, 2.0],
    # [0.9 log(1 + e^{−βh}) − 0.1 log(1 + e^{βh})] / 0.8
    ("robust", 0.1): [(0.9 * softplus(-x) - 0.1 * softplus(x)) / 0.8 for x in BETA_H],
    # ε = 0: plain DPO
    ("robust", 0.0): [softplus(-0.5), softplus(0.5), softplus(1.0)],
}


def hand_loss(loss_type, label_smoothing, **kwargs):
    return dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.5,
                    loss_type=loss_type, label_smoothing=label_smoothing, **kwargs)


@pytest.mark.parametrize("loss_type, label_smoothing", list(HAND))
def test_dpo_hand_values(loss_type, label_smoothing):
    expected = torch.tensor(HAND[loss_type, label_smoothing])
    losses, stats = hand_loss(loss_type, label_smoothing, reduction="none")
    assert losses.dtype == torch.float32 and losses.shape == (3,)
    assert_close(losses, expected, rtol=1e-6, atol=1e-7)
    assert_close(hand_loss(loss_type, label_smoothing)[0], expected.mean(), rtol=1e-6, atol=1e-7)
    assert_close(hand_loss(loss_type, label_smoothing, reduction="sum")[0], expected.sum(), rtol=1e-6, atol=1e-7)
    # Rewards are β · log-ratios: chosen 0.5 · [0.5, 0, -1], rejected 0.5 · [-0.5, 1, 1].
    assert isinstance(stats, DPOStats)
    assert_close(stats.rewards_chosen, torch.tensor([0.25, 0.0, -0.5]), rtol=0, atol=0)
    assert_close(stats.rewards_rejected, torch.tensor([-0.25, 0.5, 0.5]), rtol=0, atol=0)
    assert_close(stats.margin, torch.tensor([0.5, -0.5, -1.0]), rtol=0, atol=0)
    assert_close(stats.accuracy, torch.tensor(1 / 3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type, label_smoothing",
                         [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_matches_naive(loss_type, label_smoothing, dtype):
    generator = torch.Generator().manual_seed(0)
    inputs = [(-20 * torch.rand(16, generator=generator, dtype=torch.float64)).to(dtype) for _ in range(4)]
    losses, stats = dpo_loss(*inputs, beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing,
                             reduction="none")
    assert losses.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = torch.tensor(naive_dpo(*[x.double() for x in inputs], 0.3, loss_type, label_smoothing),
                            dtype=torch.float64)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5  # fp32 log-ratios of values up to 20
    assert_close(losses.double(), expected, rtol=tolerance, atol=tolerance)
    assert not any(s.requires_grad for s in stats)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_dpo_log2_at_policy_equal_reference(loss_type, label_smoothing):
    # At h = 0: −(1 − ε) log σ(0) − ε log σ(0) = log 2, and [(1 − ε) − ε] log 2 / (1 − 2ε) = log 2.
    chosen, rejected = -10 * torch.rand(8), -10 * torch.rand(8)
    loss, stats = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), loss_type=loss_type,
                           label_smoothing=label_smoothing)
    assert (stats.rewards_chosen == 0).all() and (stats.rewards_rejected == 0).all() and (stats.margin == 0).all()
    assert stats.accuracy == 0
    # Exact at ε = 0 (h is exactly 0); with ε > 0 the weighted sum may round by an ulp.
    tolerance = 0 if label_smoothing == 0 else 2e-7
    assert_close(loss, torch.tensor(math.log(2)), rtol=tolerance, atol=0)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradient_raises_chosen_lowers_rejected(loss_type):
    # Small log-ratios: βh < 1 (hinge active) and h < 1/(2β) (IPO still pushes the margin up).
    generator = torch.Generator().manual_seed(1)
    policy_chosen = (-5 * torch.rand(6, generator=generator)).requires_grad_(True)
    policy_rejected = (-5 * torch.rand(6, generator=generator)).requires_grad_(True)
    reference_chosen = (policy_chosen.detach() + 0.1 * torch.randn(6, generator=generator)).requires_grad_(True)
    reference_rejected = (policy_rejected.detach() + 0.1 * torch.randn(6, generator=generator)).requires_grad_(True)
    label_smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    loss, _ = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                       loss_type=loss_type, label_smoothing=label_smoothing)
    loss.backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()  # descent: chosen up, rejected down
    assert reference_chosen.grad is None and reference_rejected.grad is None  # the reference is detached


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust"])
def test_dpo_higher_margin_lower_loss(loss_type):
    h = torch.linspace(-30, 30, 61, dtype=torch.float64)  # implicit margin via the chosen log-ratio alone
    zeros = torch.zeros_like(h)
    label_smoothing = 0.2 if loss_type == "robust" else 0.0
    losses, _ = dpo_loss(h - 40, zeros - 40, zeros - 40, zeros - 40, beta=0.1, loss_type=loss_type,
                         label_smoothing=label_smoothing, reduction="none")
    steps = losses.diff()
    assert (steps <= 0).all()
    active = 0.1 * h[:-1] < 1 if loss_type == "hinge" else torch.ones_like(steps, dtype=torch.bool)
    assert (steps[active] < 0).all()


def test_dpo_label_smoothing_optimum_is_finite():
    # cDPO's per-pair loss is minimised where σ(βh) = 1 − ε, i.e. βh = log((1 − ε) / ε): its gradient is 0 there.
    eps, beta = 0.1, 0.5
    h = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    loss, _ = dpo_loss(h, zero, zero, zero, beta=beta, label_smoothing=eps)
    (grad,) = torch.autograd.grad(loss, h)
    assert_close(grad, torch.zeros(1, dtype=torch.float64), rtol=0, atol=1e-15)


def test_dpo_gradcheck():
    generator = torch.Generator().manual_seed(2)
    inputs = [-5 * torch.rand(4, generator=generator, dtype=torch.float64) for _ in range(4)]
    policy = [x.requires_grad_(True) for x in inputs[:2]]
    for loss_type, label_smoothing in [("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]:
        assert torch.autograd.gradcheck(
            lambda c, r: dpo_loss(c, r, *inputs[2:], beta=0.7, loss_type=loss_type,
                                  label_smoothing=label_smoothing)[0], policy)


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": 0.0}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"loss_type": "kto"}, "loss_type"),
    ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
    ({"reduction": "max"}, "reduction"),
])
def test_dpo_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, **kwargs)


def test_dpo_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED[:2], REFERENCE_CHOSEN, REFERENCE_REJECTED)


# ---- reward model -------------------------------------------------------------------------------------------
# r_c − r_r = [1, -1, 0]; r_c + r_r = [3, -1, -2]
CHOSEN_SCORES = torch.tensor([2.0, 0.0, -1.0])
REJECTED_SCORES = torch.tensor([1.0, 1.0, -1.0])


@pytest.mark.parametrize("margin, center_coefficient, expected", [
    # −log σ(d) = log(1 + e^{−d})
    (None, 0.0, [softplus(-1.0), softplus(1.0), math.log(2)]),
    # d − m = [0.5, -1, -1]
    (torch.tensor([0.5, 0.0, 1.0]), 0.0, [softplus(-0.5), softplus(1.0), softplus(1.0)]),
    # + 0.1 (r_c + r_r)² = + 0.1 · [9, 1, 4]
    (None, 0.1, [softplus(-1.0) + 0.9, softplus(1.0) + 0.1, math.log(2) + 0.4]),
    (torch.tensor([0.5, 0.0, 1.0]), 0.1, [softplus(-0.5) + 0.9, softplus(1.0) + 0.1, softplus(1.0) + 0.4]),
])
def test_reward_loss_hand_values(margin, center_coefficient, expected):
    expected = torch.tensor(expected)
    losses, stats = reward_loss(CHOSEN_SCORES, REJECTED_SCORES, margin, center_coefficient=center_coefficient,
                                reduction="none")
    assert_close(losses, expected, rtol=1e-6, atol=1e-7)
    loss, _ = reward_loss(CHOSEN_SCORES, REJECTED_SCORES, margin, center_coefficient=center_coefficient)
    assert_close(loss, expected.mean(), rtol=1e-6, atol=1e-7)
    loss, _ = reward_loss(CHOSEN_SCORES, REJECTED_SCORES, margin, center_coefficient=center_coefficient,
                          reduction="sum")
    assert_close(loss, expected.sum(), rtol=1e-6, atol=1e-7)
    # Stats ignore the margin and the centering: only the first pair is strictly ordered (the tie is not).
    assert isinstance(stats, RewardStats)
    assert_close(stats.accuracy, torch.tensor(1 / 3))
    assert_close(stats.margin, torch.tensor(0.0), rtol=0, atol=0)
    assert_close(stats.chosen_mean, torch.tensor(1 / 3))
    assert_close(stats.rejected_mean, torch.tensor(1 / 3))


def test_reward_loss_dtype_and_gradcheck():
    generator = torch.Generator().manual_seed(3)
    chosen, rejected, margin = (torch.randn(5, generator=generator, dtype=torch.float64) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda c, r: reward_loss(c, r, margin.abs(), center_coefficient=0.05)[0],
        (chosen.requires_grad_(True), rejected.requires_grad_(True)))
    loss, stats = reward_loss(chosen.detach().bfloat16(), rejected.detach().bfloat16())
    assert loss.dtype == torch.float32 and all(s.dtype == torch.float32 and not s.requires_grad for s in stats)


def test_reward_loss_gradient_separates_scores():
    chosen, rejected = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    reward_loss(chosen, rejected)[0].backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


@pytest.mark.parametrize("args, kwargs, match", [
    ((CHOSEN_SCORES, REJECTED_SCORES[:2]), {}, "rejected_scores"),
    ((CHOSEN_SCORES, REJECTED_SCORES, torch.zeros(2)), {}, "margin"),
    ((CHOSEN_SCORES, REJECTED_SCORES), {"center_coefficient": -0.1}, "center_coefficient"),
    ((CHOSEN_SCORES, REJECTED_SCORES), {"reduction": "max"}, "reduction"),
])
def test_reward_loss_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reward_loss(*args, **kwargs)
