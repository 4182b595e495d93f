"""RL loss math: masked statistics, GAE against a per-sequence loop, group advantages, KL estimators, the clipped
PPO losses and the GRPO aggregation types against hand-derived values."""

import math

import pytest
import torch

from lit_distill.losses import (clipped_policy_loss, clipped_value_loss, gae, group_advantages, grpo_loss,
                                kl_estimate, masked_mean, masked_var, masked_whiten, step_denominators)


def ragged_mask(lengths, width):
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


# ---- masked statistics ----------------------------------------------------------------------------------------
def test_masked_mean_and_var_match_the_unmasked_entries():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = ragged_mask([2, 1], 3)
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(torch.tensor([1.0, 2.0, 3.0]).var().item())
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    assert torch.equal(masked_mean(values, mask, dim=1), torch.tensor([1.5, 3.0]))


def test_masked_mean_of_nothing_is_zero_and_attached():
    values = torch.ones(2, 3, requires_grad=True)
    result = masked_mean(values, torch.zeros(2, 3))
    assert result.item() == 0.0 and result.requires_grad


def test_masked_whiten_has_zero_mean_unit_variance_and_zero_padding():
    torch.manual_seed(0)
    values = torch.randn(4, 6) * 3 + 2
    mask = ragged_mask([6, 4, 2, 5], 6)
    whitened = masked_whiten(values, mask)
    assert masked_mean(whitened, mask).abs().item() < 1e-6
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(whitened[mask == 0] == 0)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(values, mask).item(), abs=1e-5)


# ---- GAE ------------------------------------------------------------------------------------------------------
def loop_gae(rewards, values, length, gamma, lam):
    """Textbook GAE on one episode of ``length`` steps with a terminal value of 0."""
    advantages = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_loop_over_each_sequence(gamma, lam):
    torch.manual_seed(1)
    lengths = [7, 3, 1, 5]
    rewards, values = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    mask = ragged_mask(lengths, 7)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row, length in enumerate(lengths):
        expected = loop_gae(rewards[row].tolist(), values[row].tolist(), length, gamma, lam)
        assert advantages[row, :length].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert torch.all(advantages[row, length:] == 0) and torch.all(returns[row, length:] == 0)
    assert torch.allclose(returns, (advantages + values.float()) * mask)


def test_gae_hand_values():
    # One episode of 2 steps, γ = 1, λ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte Carlo).
    advantages, returns = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 1.0)
    assert advantages.tolist() == [[0.5, 0.75]]
    assert returns.tolist() == [[1.0, 1.0]]


# ---- group advantages -----------------------------------------------------------------------------------------
def test_group_advantages_hand_values_for_each_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # three groups of 2
    group_std = math.sqrt(0.5)
    advantages, stats = group_advantages(rewards, 2, "group", eps=0.0)
    assert advantages.tolist() == pytest.approx([0.5 / group_std, -0.5 / group_std, -0.5 / group_std,
                                                 0.5 / group_std, 0.0, 0.0])
    assert stats.frac_zero_std.item() == pytest.approx(1 / 3)
    advantages, _ = group_advantages(rewards, 2, "batch", eps=0.0)
    assert advantages.tolist() == pytest.approx((torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0]) / rewards.std()).tolist())
    advantages, _ = group_advantages(rewards, 2, "none")
    assert advantages.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_std_group_gives_exactly_zero_advantage(scale):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.7, 0.2, 0.2, 0.9])
    advantages, stats = group_advantages(rewards, 4, scale)
    assert torch.all(advantages[:4] == 0) and torch.isfinite(advantages).all()
    assert stats.frac_zero_std.item() == 0.5


def test_group_advantages_rejects_a_ragged_group():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


# ---- KL estimators --------------------------------------------------------------------------------------------
def test_kl_estimators_hand_values():
    logprobs, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    log_r = math.log(0.5)  # log π_ref − log π
    assert kl_estimate(logprobs, ref, "k1").item() == pytest.approx(-log_r)
    assert kl_estimate(logprobs, ref, "k2").item() == pytest.approx(0.5 * log_r ** 2)
    assert kl_estimate(logprobs, ref, "k3").item() == pytest.approx(0.5 - 1 - log_r)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(logprobs, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    logp, logq = p.log()[samples], q.log()[samples]
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_estimate(logp, logq, "k3").min().item() >= 0


# ---- PPO ------------------------------------------------------------------------------------------------------
def test_approx_kl_is_cleanrls_estimate_of_kl_old_to_new():
    # Per token, with log ρ = log π − log π_old: (ρ − 1) − log ρ (cleanrl's approx_kl), hand-computed.
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    new = torch.tensor([[-0.5, -2.2, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    _, stats = clipped_policy_loss(new, old, torch.zeros(1, 3), mask)
    # (The mirrored estimator, log ρ = log π_old − log π, gives 0.0426.)
    expected = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.2) - 1 + 0.2) + 0.0) / 3
    assert stats.approx_kl.item() == pytest.approx(expected, rel=1e-6)


def test_policy_loss_at_the_old_policy_is_minus_the_advantage_with_unit_ratio():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask)
    assert loss.item() == pytest.approx(1.0)  # −(1 − 2)
    assert stats.ratio_mean.item() == 1.0 and stats.clipfrac.item() == 0.0 and stats.approx_kl.item() == 0.0
    loss.backward()
    assert logprobs.grad.tolist() == [[-1.0, 2.0, 0.0]]  # ∂(−Aρ)/∂logπ = −A at ρ = 1


def test_policy_loss_clips_hand_values():
    old = torch.zeros(1, 4)
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +, +, −, −
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    per_token, stats = clipped_policy_loss(logprobs, old, advantages, torch.ones(1, 4), clip_eps=0.2,
                                           reduction="none")
    # A>0, ρ=1.5: max(−1.5, −1.2) = −1.2 (clipped); A>0, ρ=0.5: max(−0.5, −0.8) = −0.5 (unclipped)
    # A<0, ρ=1.5: max(1.5, 1.2) = 1.5 (unclipped);  A<0, ρ=0.5: max(0.5, 0.8) = 0.8 (clipped)
    assert per_token[0].tolist() == pytest.approx([-1.2, -0.5, 1.5, 0.8])
    assert stats.clipfrac.item() == 0.5
    per_token.sum().backward()
    assert logprobs.grad[0, 0].item() == 0.0 and logprobs.grad[0, 3].item() == 0.0  # clipped: no gradient
    # clip-higher widens only the upper bound
    per_token, _ = clipped_policy_loss(logprobs, old, advantages, torch.ones(1, 4), clip_eps=0.2,
                                       clip_eps_high=0.6, reduction="none")
    assert per_token[0, 0].item() == pytest.approx(-1.5)


def test_higher_advantage_gives_lower_policy_loss():
    torch.manual_seed(0)
    logprobs, old = -torch.rand(3, 5), -torch.rand(3, 5)
    mask = torch.ones(3, 5)
    low, _ = clipped_policy_loss(logprobs, old, torch.full((3,), 0.5), mask)
    high, _ = clipped_policy_loss(logprobs, old, torch.full((3,), 1.5), mask)
    assert high < low


def test_value_loss_hand_values():
    values = torch.tensor([[1.0, 0.0]])
    old_values = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, stats = clipped_value_loss(values, old_values, returns, torch.ones(1, 2), clip_range=0.2,
                                     reduction="none")
    # token 0: unclipped (1−2)² = 1, clipped (0.2−2)² = 3.24 → ½·3.24; token 1: both (0−1)² → ½
    assert loss[0].tolist() == pytest.approx([1.62, 0.5])
    assert stats.clipfrac.item() == 0.5
    loss, _ = clipped_value_loss(values, old_values, returns, torch.ones(1, 2), clip_range=None, reduction="mean")
    assert loss.item() == pytest.approx((0.5 + 0.5) / 2)


# ---- GRPO -----------------------------------------------------------------------------------------------------
def grpo_inputs():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return logprobs, advantages, mask


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", (-1.0 + 2.0) / 2),          # per-sequence token means −1 and +2, averaged over 2 sequences
    ("bnpo", (-3.0 + 2.0) / 4),          # token sum over 4 tokens
    ("dapo", (-3.0 + 2.0) / 4),
    ("dr_grpo", (-3.0 + 2.0) / (2 * 5)),  # token sum over sequences × max_completion_length
])
def test_grpo_aggregation_hand_values(loss_type, expected):
    logprobs, advantages, mask = grpo_inputs()
    numerator, denominator, stats = grpo_loss(logprobs, logprobs, advantages, mask, loss_type=loss_type,
                                              max_completion_length=5)
    assert (numerator / denominator).item() == pytest.approx(expected)
    assert stats.kl.item() == 0.0 and stats.clip_ratio.item() == 0.0


@pytest.mark.parametrize("loss_type,expected", [
    # Three ragged micro-batches, token sums −1, 2 and 6 over 4, 1 and 2 tokens.
    ("dapo", (-1.0 + 2.0 + 6.0) / 7),                  # one mean over the step's 7 tokens
    ("bnpo", (-1.0 / 4 + 2.0 / 1 + 6.0 / 2) / 3),      # TRL: the mean of the micro-batches' token means
])
def test_step_denominators_over_ragged_micro_batches(loss_type, expected):
    logprobs, advantages, mask = grpo_inputs()
    micro = [(logprobs, advantages, mask), (logprobs[1:], advantages[1:], mask[1:]),
             (logprobs[:1, :2], torch.tensor([-3.0]), mask[:1, :2])]
    denominators = step_denominators([m for _, _, m in micro], loss_type)
    loss = sum(grpo_loss(lp, lp, adv, m, loss_type=loss_type)[0] / denominator
               for (lp, adv, m), denominator in zip(micro, denominators))
    assert loss.item() == pytest.approx(expected)


def test_grpo_kl_term_hand_value():
    logprobs, advantages, mask = grpo_inputs()
    ref = logprobs + math.log(0.5)  # log r = log 0.5 on every token → k3 = 0.5 − 1 − log 0.5
    k3 = 0.5 - 1 - math.log(0.5)
    numerator, denominator, stats = grpo_loss(logprobs, logprobs, torch.zeros(2), mask, loss_type="dapo",
                                              beta=0.1, ref_logprobs=ref)
    assert (numerator / denominator).item() == pytest.approx(0.1 * k3)
    assert stats.kl.item() == pytest.approx(k3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, logprobs, advantages, mask, beta=0.1)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_step_sum_over_micro_batches_equals_the_full_batch(loss_type):
    torch.manual_seed(0)
    logprobs, old = -torch.rand(6, 5), -torch.rand(6, 5)
    advantages, mask = torch.randn(6), ragged_mask([5, 1, 3, 2, 4, 5], 5)
    kwargs = dict(loss_type=loss_type, max_completion_length=5)
    full = grpo_loss(logprobs, old, advantages, mask, **kwargs)
    parts = [grpo_loss(logprobs[s], old[s], advantages[s], mask[s], **kwargs) for s in (slice(0, 2), slice(2, 6))]
    micro = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert micro.item() == pytest.approx((full[0] / full[1]).item(), rel=1e-6)


def test_grpo_rejects_unknown_type_and_dr_grpo_without_length():
    logprobs, advantages, mask = grpo_inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logprobs, logprobs, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logprobs, logprobs, advantages, mask, loss_type="dr_grpo")
