"""The policy-gradient estimators on the GRPO plumbing: GSPO's sequence-level ratio in ``grpo_loss`` (hand value,
per-sequence loop, the GSPO-token stop-gradient form, parity with TRL's ``GRPOTrainer._compute_loss``), RLOO's
leave-one-out and REINFORCE++'s batch-normalised advantages (hand values, loops, TRL / OpenRLHF definitions)."""

import math
from types import SimpleNamespace

import pytest
import torch

from lit_distill.losses.grpo import grpo_loss
from lit_distill.losses.rl import reinforce_pp_advantages, rloo_advantages


def ragged_mask(lengths, width):
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


def gspo_inputs(seed=0, lengths=(5, 1, 3, 2, 4, 5)):
    torch.manual_seed(seed)
    mask = ragged_mask(list(lengths), 5)
    old = -torch.rand(len(lengths), 5) * 2
    logprobs = (old + 0.3 * torch.randn(len(lengths), 5)).requires_grad_()
    return logprobs, old, torch.randn(len(lengths)), mask


# ---- GSPO: sequence-level ratio -----------------------------------------------------------------------------------
def test_gspo_hand_value():
    # Sequence 1: token log ratios 0.1 and 0.3 → s = exp(0.2) = 1.2214 > 1 + ε: clipped at 1.2 for A = +1.
    # Sequence 2: one token, log ratio log 0.9 → s = 0.9 inside [0.8, 1.2], A = −2: loss −A·s = 1.8.
    old = torch.zeros(2, 2)
    logprobs = torch.tensor([[0.1, 0.3], [math.log(0.9), 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    numerator, denominator, stats = grpo_loss(logprobs, old, torch.tensor([1.0, -2.0]), mask, loss_type="grpo",
                                              importance_sampling_level="sequence")
    assert denominator.item() == 2
    assert (numerator / denominator).item() == pytest.approx((-1.2 + 1.8) / 2)
    assert stats.clip_ratio.item() == pytest.approx(2 / 3)  # sequence 1's two tokens of three
    numerator.backward()
    # Clipped sequence: no gradient; sequence 2: d(−A·s)/d log π = −A·s / |y| = 1.8 on its only real token.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0], [1.8, 0.0]]))


def loop_gspo(logprobs, old, advantages, mask, eps=0.2):
    """GSPO's objective (Zheng et al. 2025, eq. 5) sequence by sequence: −1/B Σ_i min(s_i A_i, clip(s_i) A_i)."""
    losses = []
    for i in range(logprobs.size(0)):
        n = int(mask[i].sum())
        s = torch.exp((logprobs[i, :n] - old[i, :n]).sum() / n)
        losses.append(-torch.min(s * advantages[i], s.clamp(1 - eps, 1 + eps) * advantages[i]))
    return torch.stack(losses).mean()


def test_gspo_matches_a_loop_over_sequences_in_value_and_gradient():
    logprobs, old, advantages, mask = gspo_inputs()
    numerator, denominator, _ = grpo_loss(logprobs, old, advantages, mask, loss_type="grpo",
                                          importance_sampling_level="sequence")
    loss = numerator / denominator
    (grad,) = torch.autograd.grad(loss, logprobs)
    reference = loop_gspo(logprobs, old, advantages, mask)
    (reference_grad,) = torch.autograd.grad(reference, logprobs)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-7)


def test_gspo_token_stop_gradient_form_gives_the_same_loss_and_gradient():
    # GSPO-token (eq. 13): s_i,t = sg(s_i) · π_t / sg(π_t), equal to s_i in value; averaged over the sequence's
    # tokens its gradient is s_i A_i · mean_t ∇log π_t, the same as the plain sequence ratio's.
    logprobs, old, advantages, mask = gspo_inputs(seed=3)
    numerator, denominator, _ = grpo_loss(logprobs, old, advantages, mask, loss_type="grpo",
                                          importance_sampling_level="sequence")
    (grad,) = torch.autograd.grad(numerator / denominator, logprobs)
    seq_log_ratio = ((logprobs - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    token_log_ratio = seq_log_ratio.detach() + logprobs - logprobs.detach()  # log s_i,t
    a = advantages[:, None]
    per_token = -torch.min(token_log_ratio.exp() * a, token_log_ratio.exp().clamp(0.8, 1.2) * a)
    reference = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(numerator / denominator, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, torch.autograd.grad(reference, logprobs)[0], rtol=1e-6, atol=1e-7)


def test_gspo_at_the_old_policy_is_grpo():
    logprobs, old, advantages, mask = gspo_inputs(seed=1)
    token = grpo_loss(logprobs, logprobs.detach(), advantages, mask, loss_type="grpo")
    sequence = grpo_loss(logprobs, logprobs.detach(), advantages, mask, loss_type="grpo",
                         importance_sampling_level="sequence")
    torch.testing.assert_close(token[0], sequence[0])
    torch.testing.assert_close(*(torch.autograd.grad(n, logprobs)[0] for n in (token[0], sequence[0])))
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logprobs, old, advantages, mask, importance_sampling_level="sentence")


# ---- TRL parity ---------------------------------------------------------------------------------------------------
class _Accelerator:
    num_processes = 1

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather


def trl_grpo_loss(logprobs, old, advantages, mask, *, loss_type, beta=0.0, ref=None, level="token", eps=0.2):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` run unmodified on a stand-in trainer whose forward returns
    ``logprobs``: every other attribute is the GRPOConfig default (no entropy mask/bonus, no vLLM, no delta)."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    from collections import defaultdict
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps,
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, accelerator=_Accelerator(), _metrics={"train": defaultdict(list)},
        max_completion_length=mask.size(1),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    inputs = {"prompt_ids": torch.zeros(mask.size(0), 1, dtype=torch.long), "prompt_mask": torch.ones(mask.size(0), 1),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_matches_trl_in_value_and_gradient(loss_type, level):
    logprobs, old, advantages, mask = gspo_inputs(seed=2)
    ref = old - 0.2 * torch.rand_like(old)
    ours_n, ours_d, _ = grpo_loss(logprobs, old, advantages, mask, loss_type=loss_type, beta=0.04, ref_logprobs=ref,
                                  importance_sampling_level=level)
    ours = ours_n / ours_d
    (ours_grad,) = torch.autograd.grad(ours, logprobs)
    theirs = trl_grpo_loss(logprobs, old, advantages, mask, loss_type=loss_type, beta=0.04, ref=ref, level=level)
    (theirs_grad,) = torch.autograd.grad(theirs, logprobs)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-6, atol=1e-7)


# ---- RLOO ---------------------------------------------------------------------------------------------------------
def test_rloo_hand_values():
    # Group [1, 2, 6]: leave-one-out means 4, 3.5, 1.5 → advantages −3, −1.5, 4.5 = 3/2 · (r − 3). Group of equal
    # rewards: exactly 0 (0.1 + 0.1 + 0.1 − 0.1 is not 0.2 in floating point).
    advantages, stats = rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.1, 0.1, 0.1]), group_size=3)
    torch.testing.assert_close(advantages[:3], torch.tensor([-3.0, -1.5, 4.5]))
    assert torch.equal(advantages[3:], torch.zeros(3))
    assert stats.frac_zero_std.item() == 0.5
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.ones(4), group_size=1)


def test_rloo_matches_a_leave_one_out_loop_and_the_rescaled_group_mean():
    torch.manual_seed(0)
    rewards, size = torch.randn(24), 4
    advantages, _ = rloo_advantages(rewards, size)
    loop = torch.tensor([rewards[i] - sum(rewards[j] for j in range(i // size * size, i // size * size + size)
                                          if j != i) / (size - 1) for i in range(24)])
    torch.testing.assert_close(advantages, loop)
    grouped = rewards.view(-1, size)
    torch.testing.assert_close(advantages, (size / (size - 1) * (grouped - grouped.mean(-1, keepdim=True))).view(-1))


def trl_rloo_advantages(rewards, num_generations, normalize_advantages=False):
    """TRL 1.16 ``RLOOTrainer._generate_and_score_completions``'s advantage lines, copied (they are inline in a
    method that generates and scores, so there is nothing to call on given rewards); β = 0."""
    from trl.trainer.utils import nanstd
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def test_rloo_matches_trls_leave_one_out_baseline():
    pytest.importorskip("trl")
    torch.manual_seed(1)
    rewards = torch.randint(0, 3, (32,)).float()  # discrete rewards: some groups all equal
    ours, _ = rloo_advantages(rewards, 4)
    torch.testing.assert_close(ours, trl_rloo_advantages(rewards, 4), rtol=0, atol=1e-6)


# ---- REINFORCE++ --------------------------------------------------------------------------------------------------
def test_reinforce_pp_hand_values():
    # Rewards per token: −β·KL plus the score on the last real token: [[−0.1, −0.2 + 1], [−0.1 − 1, pad]]; returns
    # [[0.7, 0.8], [−1.1]]; then whitened over the batch's 3 tokens (mean 0.4/3, unbiased std).
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    kl = torch.tensor([[0.2, 0.4], [0.2, 9.0]])
    advantages = reinforce_pp_advantages(torch.tensor([1.0, -1.0]), mask, kl, kl_coef=0.5)
    returns = torch.tensor([0.7, 0.8, -1.1])
    expected = (returns - returns.mean()) / returns.std()
    torch.testing.assert_close(advantages[mask.bool()], expected, rtol=1e-5, atol=1e-6)
    assert advantages[1, 1].item() == 0.0


def openrlhf_reinforce(scores, mask, kl, kl_coef, gamma):
    """OpenRLHF's REINFORCE++ written as loops: ``compute_reward`` (−β·KL per token, the score added at the last
    action), ``get_cumulative_returns``, then the batch normalisation of ``advantage_estimator=reinforce``
    (mean and *biased* variance over every action token, ``rsqrt(var.clamp(min=1e-8))``)."""
    returns = torch.zeros_like(mask)
    for b in range(mask.size(0)):
        n = int(mask[b].sum())
        reward = [-kl_coef * kl[b, t].item() + (scores[b].item() if t == n - 1 else 0.0) for t in range(n)]
        running = 0.0
        for t in reversed(range(n)):
            running = reward[t] + gamma * running
            returns[b, t] = running
    tokens = returns[mask.bool()]
    mean, var = tokens.mean(), ((tokens - tokens.mean()) ** 2).mean()
    return (returns - mean) * var.clamp(min=1e-8).rsqrt() * mask


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_openrlhfs_definition_up_to_bessels_correction(gamma):
    torch.manual_seed(2)
    mask = ragged_mask([5, 1, 3, 2, 4, 5], 5)
    scores, kl = torch.randn(6), torch.rand(6, 5)
    ours = reinforce_pp_advantages(scores, mask, kl, kl_coef=0.1, gamma=gamma)
    n = mask.sum()
    # We whiten with the unbiased variance (masked_whiten, as PPO's advantages); OpenRLHF with the biased one.
    torch.testing.assert_close(ours * torch.sqrt(n / (n - 1)), openrlhf_reinforce(scores, mask, kl, 0.1, gamma),
                               rtol=1e-5, atol=1e-6)
