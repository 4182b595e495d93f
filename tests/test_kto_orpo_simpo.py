"""SimPO, ORPO and KTO: hand values, naive loops, gradients, TRL parity, unpaired data, and the DPOModule wiring."""

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from conftest import TOKENIZER
from lit_distill.data.preference import collate_unpaired, mismatched_rows
from lit_distill.losses import ORPOStats, kto_loss, log_odds, orpo_loss, simpo_loss
from lit_distill.modules import DPOModule
from lit_distill.models.loading import ModelSpec
from test_preference_modules import POLICY, first_batch, fit, preference_data
from tests.test_cli import ddp_fit_metrics

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


# ---- KTO --------------------------------------------------------------------------------------------------------

def kto_inputs(dtype=torch.float64):
    # r = policy − reference = 2, 0, −1, 1; KL terms 1, 0, 0.5, 0.5: z = 0.5.
    reference = torch.tensor([-3.0, -2.0, -4.0, -1.0], dtype=dtype)
    policy = reference + torch.tensor([2.0, 0.0, -1.0, 1.0], dtype=dtype)
    reference_kl = torch.tensor([-5.0, -6.0, -5.0, -7.0], dtype=dtype)
    policy_kl = reference_kl + torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=dtype)
    return policy, reference, policy_kl, reference_kl, torch.tensor([True, True, False, False])


def naive_kto(policy, reference, policy_kl, reference_kl, desirable, beta, w_d, w_u):
    kl_terms = [p - r for p, r in zip(policy_kl.tolist(), reference_kl.tolist())]
    z = max(0.0, sum(kl_terms) / len(kl_terms))
    losses = []
    for p, r, good in zip(policy.tolist(), reference.tolist(), desirable.tolist()):
        x = beta * ((p - r) - z) if good else beta * (z - (p - r))
        losses.append((w_d if good else w_u) * (1 - 1 / (1 + math.exp(-x))))
    return losses


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_kto_hand_values():
    # β = 2: desirable 1 − σ(2(2 − 0.5)), 1 − σ(2(0 − 0.5)); undesirable 1 − σ(2(0.5 + 1)), 1 − σ(2(0.5 − 1)).
    losses, stats = kto_loss(*kto_inputs(), beta=2.0, desirable_weight=1.5, undesirable_weight=0.5, reduction="none")
    expected = torch.tensor([1.5 * (1 - sigmoid(3)), 1.5 * (1 - sigmoid(-1)), 0.5 * (1 - sigmoid(3)),
                             0.5 * (1 - sigmoid(-1))], dtype=torch.float64)
    assert_close(losses, expected)
    assert stats.kl.item() == pytest.approx(0.5)
    assert_close(stats.rewards, torch.tensor([4.0, 0.0, -2.0, 2.0], dtype=torch.float64))


def test_kto_takes_a_reference_point_computed_over_more_rows():
    policy, reference, policy_kl, reference_kl, desirable = kto_inputs()
    for z in (torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.3, dtype=torch.float64)):
        losses, stats = kto_loss(policy, reference, None, None, desirable, beta=2.0, kl_mean=z, reduction="none")
        expected = naive_kto(policy, reference, reference + z.clamp(min=0), reference, desirable, 2.0, 1.0, 1.0)
        assert_close(losses, torch.tensor(expected, dtype=torch.float64))
        assert stats.kl.item() == max(z.item(), 0.0)
    with pytest.raises(ValueError, match="unless kl_mean is given"):
        kto_loss(policy, reference, None, None, desirable)


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    policy, reference, policy_kl, reference_kl, desirable = kto_inputs()
    policy, policy_kl = policy.clone().requires_grad_(), (reference_kl - 1.0).requires_grad_()  # KL estimate −1
    loss, stats = kto_loss(policy, reference, policy_kl, reference_kl, desirable, beta=1.0)
    assert stats.kl.item() == 0.0
    loss.backward()
    assert policy_kl.grad is None or not policy_kl.grad.any()
    assert (policy.grad[desirable] < 0).all() and (policy.grad[~desirable] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kto_matches_naive(dtype):
    torch.manual_seed(0)
    inputs = [-torch.rand(12, dtype=dtype) * 5 for _ in range(4)] + [torch.rand(12) > 0.4]
    losses, _ = kto_loss(*inputs, beta=0.3, desirable_weight=1.2, undesirable_weight=0.8, reduction="none")
    assert_close(losses, torch.tensor(naive_kto(*inputs, 0.3, 1.2, 0.8), dtype=dtype))
    total, _ = kto_loss(*inputs, beta=0.3, desirable_weight=1.2, undesirable_weight=0.8, reduction="sum")
    assert_close(total, losses.sum())
    assert torch.autograd.gradcheck(
        lambda p: kto_loss(p, *[x.double() for x in inputs[1:4]], inputs[4], beta=0.3)[0],
        (inputs[0].double().requires_grad_(),))


@pytest.mark.parametrize("kwargs,match", [(dict(beta=0.0), "beta"), (dict(desirable_weight=0.0), "weight"),
                                          (dict(reduction="avg"), "reduction")])
def test_kto_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kto_loss(*kto_inputs(), **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(*kto_inputs()[:4], torch.tensor([True]))


@pytest.mark.parametrize("kl_shift", [0.5, -0.5])  # the KL estimate's sign: z > 0, or clamped to 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kto_matches_trl_kto_trainer(dtype, kl_shift):
    """TRL 1.16 has no standalone KTO loss: KTOTrainer._compute_loss takes a model and a batch. It runs here on a
    stand-in trainer (precomputed reference log-probs, one rank) and a stand-in model whose per-token log-probs are
    the sequence log-probs (one completion token per row), so both sides see identical inputs. TRL's loss is the
    mean over rows (``nanmean``), as ``reduction="mean"``."""
    pytest.importorskip("trl")
    from collections import defaultdict
    from types import MethodType
    from trl.trainer.kto_trainer import KTOTrainer

    torch.manual_seed(0)
    size = 10
    policy, reference, reference_kl = (-torch.rand(size, dtype=dtype) * 5 for _ in range(3))
    policy_kl = reference_kl + kl_shift + 0.2 * torch.randn(size, dtype=dtype)
    policy.requires_grad_()
    desirable = torch.rand(size) > 0.5
    batch = {"input_ids": torch.zeros(size, 2, dtype=torch.long), "attention_mask": torch.ones(size, 2),
             "completion_mask": torch.ones(size, 2), "KL_input_ids": torch.ones(size, 2, dtype=torch.long),
             "KL_attention_mask": torch.ones(size, 2), "KL_completion_mask": torch.ones(size, 2), "label": desirable,
             "ref_logps": reference, "ref_KL_logps": reference_kl}

    def model(input_ids, **kwargs):
        logps = policy_kl if input_ids is batch["KL_input_ids"] else policy
        return SimpleNamespace(log_probs=logps[:, None], entropy=torch.zeros(size, 1),
                               mean_logits=torch.zeros(size, 1))

    trainer = SimpleNamespace(model=SimpleNamespace(training=True), calculate_KL=True, precompute_ref_logps=True,
                              loss_type="kto", beta=0.3, desirable_weight=1.3, undesirable_weight=0.7,
                              aux_loss_enabled=False, accelerator=SimpleNamespace(device="cpu",
                                                                                  gather_for_metrics=lambda x: x),
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, trainer)
    theirs = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    (theirs_grad,) = torch.autograd.grad(theirs, policy)
    ours, stats = kto_loss(policy, reference, policy_kl, reference_kl, desirable, beta=0.3, desirable_weight=1.3,
                           undesirable_weight=0.7)
    (ours_grad,) = torch.autograd.grad(ours, policy)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert_close(ours, theirs.to(ours.dtype), **tolerance)
    assert_close(ours_grad, theirs_grad, **tolerance)
    assert stats.kl.item() == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-6)
    assert (stats.kl > 0) == (kl_shift > 0)


# ---- unpaired data ----------------------------------------------------------------------------------------------

def test_mismatched_rows_skip_rows_with_the_same_prompt():
    assert mismatched_rows([[1], [2], [3]]) == [2, 0, 1]  # TRL's shift by one
    assert mismatched_rows([[1], [1], [2], [2]]) == [3, 3, 1, 1]  # an unpaired pair's rows never meet
    assert mismatched_rows([[1], [1]]) == [1, 0]  # one prompt: nothing else to pair with


def test_collate_unpaired_builds_mismatched_kl_rows():
    examples = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 2], "label": True},
                {"prompt_ids": [9], "completion_ids": [10, 11, 12, 2], "label": False}]
    batch = collate_unpaired(examples, pad_token_id=0, max_length=5)
    assert batch["label"].tolist() == [True, False]
    assert batch["completion_input_ids"].tolist() == [[5, 6, 7, 8, 2], [9, 10, 11, 12, 2]]
    assert batch["completion_labels"].tolist() == [[-100, -100, -100, 8, 2], [-100, 10, 11, 12, 2]]
    # Row 0's prompt is cut from the left to fit row 1's 4-token completion; row 1 gets row 0's completion.
    assert batch["kl_input_ids"].tolist() == [[7, 10, 11, 12, 2], [9, 8, 2, 0, 0]]
    assert batch["kl_labels"].tolist() == [[-100, 10, 11, 12, 2], [-100, 8, 2, -100, -100]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_squad_unpaired_rows_are_each_pair_split_by_label():
    pairs, rows = preference_data(), preference_data(unpaired=True)
    assert len(rows.datasets["train"]) == 2 * len(pairs.datasets["train"])
    pair, (good, bad) = pairs.datasets["train"][0], rows.datasets["train"][:2]
    assert good["label"] and not bad["label"] and good["prompt_ids"] == bad["prompt_ids"] == pair["prompt_ids"]
    assert good["prompt_ids"] + good["completion_ids"] == pair["chosen_input_ids"]
    assert bad["prompt_ids"] + bad["completion_ids"] == pair["rejected_input_ids"]
    batch = first_batch(rows)
    assert set(batch) == {f"{side}_{key}" for side in ("completion", "kl")
                          for key in ("input_ids", "attention_mask", "labels")} | {"label"}


def test_jsonl_unpaired_rows_and_a_bad_label_names_file_and_line(tmp_path):
    from lit_distill.data import JSONLPreferenceDataModule
    from lit_distill.data.io import DataFileError

    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}", "label": i % 2 == 0} for i in range(8)]
    good = tmp_path / "unpaired.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = JSONLPreferenceDataModule(str(good), tokenizer=TOKENIZER, unpaired=True, validation_fraction=0.25,
                                     batch_size=4)
    data.setup("fit")
    assert len(data.datasets["train"]) == 6 and [row["label"] for row in data.datasets["validation"]] == [True, False]
    assert first_batch(data)["kl_input_ids"].shape[0] == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "label": "yes"}) + "\n")
    with pytest.raises(DataFileError, match=rf"{bad}:2: field 'label' must be true or false, got 'yes'"):
        JSONLPreferenceDataModule(str(bad), tokenizer=TOKENIZER, unpaired=True).setup("fit")
    with pytest.raises(DataFileError, match=rf"{good}:1: missing field\(s\) \['chosen', 'rejected'\]"):
        JSONLPreferenceDataModule(str(good), tokenizer=TOKENIZER).setup("fit")


# ---- KTO in DPOModule -------------------------------------------------------------------------------------------

def test_kto_module_matches_the_loss_on_its_own_log_probs():
    torch.manual_seed(0)
    module = DPOModule(policy=ModelSpec(**POLICY), loss_type="kto", beta=0.5, desirable_weight=1.2)
    assert module.reference is not None
    batch = first_batch(preference_data(unpaired=True))
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # policy != reference
        loss, stats, policy, policy_kl = module.preference_loss(batch, reduction="mean")
        sums = {}
        for model_name, model in (("policy", module.model), ("reference", module.reference)):
            for side in ("completion", "kl"):
                logits = model(input_ids=batch[f"{side}_input_ids"],
                               attention_mask=batch[f"{side}_attention_mask"]).logits[:, :-1]  # (B, T - 1, V)
                targets = batch[f"{side}_labels"][:, 1:]
                token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                sums[model_name, side] = (token_logps * (targets != -100)).sum(-1)  # (B,)
    assert_close(policy, sums["policy", "completion"], rtol=1e-5, atol=1e-5)
    expected, _ = kto_loss(sums["policy", "completion"], sums["reference", "completion"], sums["policy", "kl"],
                           sums["reference", "kl"], batch["label"], beta=0.5, desirable_weight=1.2)
    assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    kl = (sums["policy", "kl"] - sums["reference", "kl"]).mean()
    assert kl != 0 and stats.kl.item() == pytest.approx(max(kl.item(), 0.0), abs=1e-5)


def test_kto_training_separates_desirable_from_undesirable_rewards():
    torch.manual_seed(0)
    module = DPOModule(policy=ModelSpec(**POLICY), loss_type="kto", beta=0.5,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    data = preference_data(unpaired=True)
    batch = first_batch(data)
    trainer = fit(module, data, max_steps=30, limit_val_batches=2, val_check_interval=30,
                  check_val_every_n_epoch=None)
    with torch.no_grad():
        _, stats, _, _ = module.preference_loss(batch, reduction="mean")
    assert stats.rewards[stats.desirable].mean() > stats.rewards[~stats.desirable].mean() + 0.5
    logged = trainer.callback_metrics  # the held-out split is too small to move in 30 steps: logged, consistent
    assert logged["val/margin"] == logged["val/rewards_desirable"] - logged["val/rewards_undesirable"] != 0
    assert logged["val/kl"] >= 0 and logged["val/loss"].isfinite()


@pytest.mark.parametrize("kwargs,data_kwargs,match", [
    (dict(loss_type="kto"), {}, "unpaired: true"),
    (dict(loss_type="sigmoid"), dict(unpaired=True), "use loss_type 'kto'"),
])
def test_kto_and_pair_losses_refuse_the_other_batch_format(kwargs, data_kwargs, match):
    module = DPOModule(policy=ModelSpec(**POLICY), **kwargs)
    with pytest.raises(ValueError, match=match):
        module.preference_loss(first_batch(preference_data(**data_kwargs)), reduction="mean")


@pytest.mark.parametrize("kwargs,match", [(dict(loss_type="kto", precompute_reference=True), "precompute_reference"),
                                          (dict(loss_type="sigmoid", desirable_weight=2.0), "KTO's"),
                                          (dict(loss_type="kto", undesirable_weight=0.0), "undesirable_weight")])
def test_kto_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOModule(policy=ModelSpec(**POLICY), **kwargs)


def test_kto_trains_under_two_process_ddp(tmp_path):
    """The reference point z is all-reduced over the ranks' mismatched rows every step (a collective that must not
    hang, in training and validation)."""
    metrics = ddp_fit_metrics(tmp_path, ["configs/dpo/quickstart.yaml", "configs/kto/quickstart.yaml"],
                          "--data.init_args.embedded_examples", "200", "--data.init_args.batch_size", "4",
                          "--data.init_args.max_examples", "{validation: 16}")
    assert len(metrics["kto/kl"]) == 2 and all(math.isfinite(value) for value in metrics["kto/kl"])
    assert metrics["val/margin"]
