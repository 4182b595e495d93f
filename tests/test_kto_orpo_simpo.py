"""SimPO and ORPO: hand values, naive loops, gradients, TRL parity, and the DPOModule wiring without a reference."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from lit_distill.losses import ORPOStats, log_odds, orpo_loss, simpo_loss
from lit_distill.modules import DPOModule
from lit_distill.models.loading import ModelSpec
from test_preference_modules import POLICY, first_batch, fit, preference_data

# Mean per-token log-probs of three pairs (chosen, rejected).
CHOSEN = torch.tensor([-1.0, -2.0, -1.0], dtype=torch.float64)
REJECTED = torch.tensor([-1.5, -1.0, -1.25], dtype=torch.float64)
# ORPO pairs with round odds: p = 3/4, 1/2, 1/3 have odds 3, 1, 1/2.
ORPO_CHOSEN = torch.tensor([math.log(3 / 4), math.log(1 / 2), math.log(1 / 3)], dtype=torch.float64)
ORPO_REJECTED = torch.tensor([math.log(1 / 3), math.log(1 / 2), math.log(3 / 4)], dtype=torch.float64)


def softplus(x):
    return math.log1p(math.exp(x)) if x < 30 else x


def naive_simpo(chosen, rejected, beta, gamma, eps):
    losses = []
    for a_c, a_r in zip(chosen.tolist(), rejected.tolist()):
        h = beta * a_c - beta * a_r - gamma
        losses.append((1 - eps) * softplus(-h) + eps * softplus(h))  # -log σ(h) = softplus(-h)
    return losses


def naive_orpo(chosen, rejected, lam):
    losses = []
    for a_c, a_r in zip(chosen.tolist(), rejected.tolist()):
        p_c, p_r = math.exp(a_c), math.exp(a_r)
        ratio = math.log(p_c / (1 - p_c)) - math.log(p_r / (1 - p_r))
        losses.append(-a_c + lam * softplus(-ratio))
    return losses


# ---- SimPO ------------------------------------------------------------------------------------------------------

def test_simpo_hand_values():
    # β = 2, γ = 0.5: h = 2·0.5 − 0.5 = 0.5, 2·(−1) − 0.5 = −2.5, 2·0.25 − 0.5 = 0.
    losses, stats = simpo_loss(CHOSEN, REJECTED, beta=2.0, gamma=0.5, reduction="none")
    expected = torch.tensor([math.log1p(math.exp(-0.5)), math.log1p(math.exp(2.5)), math.log(2)], dtype=torch.float64)
    assert_close(losses, expected)
    assert_close(stats.rewards_chosen, 2 * CHOSEN)
    assert_close(stats.margin, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    assert stats.accuracy.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("gamma,eps", [(0.0, 0.0), (0.5, 0.0), (1.5, 0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simpo_matches_naive(gamma, eps, dtype):
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(16, dtype=dtype) * 3, -torch.rand(16, dtype=dtype) * 3
    losses, _ = simpo_loss(chosen, rejected, beta=2.5, gamma=gamma, label_smoothing=eps, reduction="none")
    assert losses.dtype == dtype
    assert_close(losses, torch.tensor(naive_simpo(chosen, rejected, 2.5, gamma, eps), dtype=dtype))
    mean, _ = simpo_loss(chosen, rejected, beta=2.5, gamma=gamma, label_smoothing=eps)
    assert_close(mean, losses.mean())


def test_simpo_margin_raises_the_loss_and_gradients_separate_the_pair():
    chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    low, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=0.0)
    high, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    assert high > low
    high.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    assert torch.autograd.gradcheck(lambda c, r: simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=0.1)[0],
                                    (CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()))


# ---- ORPO -------------------------------------------------------------------------------------------------------

def test_log_odds_is_stable_on_both_sides_of_minus_log_two():
    a = torch.tensor([-1e-7, -0.5, math.log(0.5), -1.0, -30.0], dtype=torch.float64)
    p = a.exp()
    assert_close(log_odds(a), torch.log(p) - torch.log1p(-p), rtol=1e-9, atol=0)
    assert log_odds(torch.tensor([-1e-7])).isfinite().all()  # float32: 1 − exp(−1e-7) cancels without expm1


def test_orpo_hand_values():
    # log odds ratios log 6, 0, −log 6: σ = 6/7, 1/2, 1/7; NLL −a_c = log(4/3), log 2, log 3.
    lam = 0.25
    losses, stats = orpo_loss(ORPO_CHOSEN, ORPO_REJECTED, beta=lam, reduction="none")
    expected = torch.tensor([math.log(4 / 3) + lam * math.log(7 / 6), math.log(2) + lam * math.log(2),
                             math.log(3) + lam * math.log(7)], dtype=torch.float64)
    assert_close(losses, expected)
    assert isinstance(stats, ORPOStats)
    assert_close(stats.margin, torch.tensor([math.log(6), 0.0, -math.log(6)], dtype=torch.float64))
    assert_close(stats.rewards_chosen, torch.tensor([math.log(3), 0.0, -math.log(2)], dtype=torch.float64))
    assert stats.accuracy.item() == pytest.approx(1 / 3)
    assert stats.nll.item() == pytest.approx((math.log(4 / 3) + math.log(2) + math.log(3)) / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_matches_naive(dtype):
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(16, dtype=dtype) * 3 - 1e-3, -torch.rand(16, dtype=dtype) * 3 - 1e-3
    losses, _ = orpo_loss(chosen, rejected, beta=0.1, reduction="none")
    assert_close(losses, torch.tensor(naive_orpo(chosen, rejected, 0.1), dtype=dtype))


def test_orpo_gradients():
    chosen, rejected = ORPO_CHOSEN.clone().requires_grad_(), ORPO_REJECTED.clone().requires_grad_()
    orpo_loss(chosen, rejected, beta=0.5)[0].backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    assert torch.autograd.gradcheck(lambda c, r: orpo_loss(c, r, beta=0.5)[0],
                                    (ORPO_CHOSEN.clone().requires_grad_(), ORPO_REJECTED.clone().requires_grad_()))


@pytest.mark.parametrize("call,match", [
    (lambda: simpo_loss(CHOSEN, REJECTED, beta=0.0), "beta"),
    (lambda: simpo_loss(CHOSEN, REJECTED, gamma=-1.0), "gamma"),
    (lambda: simpo_loss(CHOSEN, REJECTED, label_smoothing=0.5), "label_smoothing"),
    (lambda: simpo_loss(CHOSEN, REJECTED[:2]), "same shape"),
    (lambda: orpo_loss(CHOSEN, REJECTED, beta=-0.1), "beta"),
    (lambda: orpo_loss(CHOSEN, REJECTED, reduction="avg"), "reduction"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- TRL parity -------------------------------------------------------------------------------------------------

def trl_trainers():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    return CPOTrainer, ORPOTrainer


def inputs_with_grad(seed, dtype):
    torch.manual_seed(seed)
    chosen, rejected = -torch.rand(32, dtype=dtype) * 4 - 1e-3, -torch.rand(32, dtype=dtype) * 4 - 1e-3
    return chosen.requires_grad_(), rejected.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,eps", [(0.5, 0.0), (1.0, 0.1)])
def test_simpo_matches_trl_cpo_loss(dtype, gamma, eps):
    """TRL's CPOTrainer.cpo_loss with loss_type="simpo" (alpha = 0: no AlphaPO transform) on the same mean log-probs;
    TRL's simpo_gamma is our γ. TRL adds cpo_alpha · NLL outside cpo_loss (default cpo_alpha = 1): pure SimPO is
    cpo_alpha = 0."""
    CPOTrainer, _ = trl_trainers()
    trl_self = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=gamma, label_smoothing=eps,
                               accelerator=SimpleNamespace(device="cpu"))
    chosen, rejected = inputs_with_grad(0, dtype)
    ours, stats = simpo_loss(chosen, rejected, beta=2.0, gamma=gamma, label_smoothing=eps)
    ours_grads = torch.autograd.grad(ours, (chosen, rejected))
    theirs, trl_chosen_rewards, trl_rejected_rewards = CPOTrainer.cpo_loss(trl_self, chosen, rejected)
    theirs = theirs.mean()
    theirs_grads = torch.autograd.grad(theirs, (chosen, rejected))
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert_close(ours, theirs, **tolerance)
    for mine, trl in zip(ours_grads, theirs_grads):
        assert_close(mine, trl, **tolerance)
    assert_close(stats.rewards_chosen, trl_chosen_rewards, **tolerance)
    assert_close(stats.rewards_rejected, trl_rejected_rewards, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_matches_trl_odds_ratio_loss(dtype):
    """TRL's ORPOTrainer.odds_ratio_loss returns λ·log σ(log odds ratio) per pair and the trainer's loss is
    ``nll − losses.mean()``; TRL's NLL is a token mean over the batch's chosen sequences (prompt included for
    decoder-only models), ours the mean over pairs of each chosen completion's mean token NLL, −a_c. With the NLL
    taken as ours, the totals and gradients agree."""
    _, ORPOTrainer = trl_trainers()
    trl_self = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    chosen, rejected = inputs_with_grad(1, dtype)
    ours, stats = orpo_loss(chosen, rejected, beta=0.25)
    ours_grads = torch.autograd.grad(ours, (chosen, rejected))
    trl_losses, _, _, _, trl_log_odds_mean = ORPOTrainer.odds_ratio_loss(trl_self, chosen, rejected)
    theirs = (-chosen).mean() - trl_losses.mean()
    theirs_grads = torch.autograd.grad(theirs, (chosen, rejected))
    # TRL upcasts to float32, so float64 inputs agree to float32 precision there.
    tolerance = dict(rtol=1e-6, atol=1e-6)
    assert_close(ours.to(theirs.dtype), theirs, **tolerance)
    for mine, trl in zip(ours_grads, theirs_grads):
        assert_close(mine, trl.to(mine.dtype), **tolerance)
    assert_close(stats.margin.mean().to(trl_log_odds_mean.dtype), trl_log_odds_mean, **tolerance)


# ---- DPOModule wiring -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_module_builds_no_reference_and_matches_the_loss(loss_type):
    torch.manual_seed(0)
    kwargs = dict(beta=2.0, gamma=0.5) if loss_type == "simpo" else dict(beta=0.1)
    module = DPOModule(policy=ModelSpec(**POLICY), loss_type=loss_type, **kwargs)
    assert module.reference is None and not module.uses_adapter_reference
    batch = first_batch(preference_data())
    with torch.no_grad():
        loss, _, chosen, rejected = module.preference_loss(batch, reduction="mean")
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        logits = module.model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]  # (2B, T - 1, V)
        targets = labels[:, 1:]
        scored = targets != -100
        token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        means = (token_logps * scored).sum(-1) / scored.sum(-1)  # (2B,) mean per-token log-probs
    assert_close(torch.cat([chosen, rejected]), means, rtol=1e-5, atol=1e-5)
    function = simpo_loss if loss_type == "simpo" else orpo_loss
    expected, _ = function(*means.chunk(2), **kwargs)
    assert_close(loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type,kwargs", [("simpo", dict(beta=2.0, gamma=0.5)), ("orpo", dict(beta=0.5))])
def test_reference_free_training_raises_the_preference_margin(loss_type, kwargs):
    torch.manual_seed(0)
    module = DPOModule(policy=ModelSpec(**POLICY), loss_type=loss_type,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), **kwargs)
    data = preference_data()
    batch = first_batch(data)
    with torch.no_grad():
        _, before, _, _ = module.preference_loss(batch, reduction="mean")
    fit(module, data, max_steps=30, limit_val_batches=0)
    with torch.no_grad():
        _, after, _, _ = module.preference_loss(batch, reduction="mean")
    assert after.margin.mean() > before.margin.mean() + 0.1 and after.accuracy > 0.8


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="simpo", precompute_reference=True), "uses no reference"),
    (dict(loss_type="orpo", reference=ModelSpec(**POLICY)), "uses no reference"),
    (dict(loss_type="sigmoid", gamma=0.5), "gamma"),
    (dict(loss_type="simpo", gamma=-0.5), "gamma"),
    (dict(loss_type="kto_pair"), "loss_type"),
])
def test_module_rejects_options_that_do_not_apply(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOModule(policy=ModelSpec(**POLICY), **kwargs)
