"""GRPO (Shao et al. 2024) with the later fixes and estimators as options: DAPO's token-level loss, clip-higher and
dynamic sampling, Dr. GRPO's unscaled advantages and constant normaliser, masking of truncated completions, GSPO's
sequence-level ratio, and the RLOO and REINFORCE++ advantage estimators on the same plumbing.

One training step = one generation round and ``num_iterations`` updates (μ in the paper):

1. Each prompt of the batch is completed ``num_generations`` (G) times by the policy (per-rank seed).
2. Rewards score the completions; each completion's advantage is its reward minus its group's mean, scaled per
   ``scale_rewards`` (or per ``advantage_estimator``); a group whose rewards are all equal gets advantage 0, or,
   with ``dynamic_sampling``, is replaced by groups of further prompts.
3. Loss per token: clipped surrogate with the sequence's advantage + β·KL_k3(π ‖ π_ref); aggregated per
   ``loss_type`` with the denominator of the whole step (all micro-batches and all ranks), or, for ``bnpo``, of
   each micro-batch (TRL's definition, see ``lit_distill.losses.grpo_loss``).

With μ = 1 the update is exactly on-policy: the "old" log-probs are the current ones detached (ratio 1, the
gradient is the policy gradient). With μ > 1 they are recorded before the first update.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.utils.data import IterableDataset

from lit_distill.checks import require
from lit_distill.losses.grpo import GRPO_LOSS_TYPES, grpo_loss, step_denominators
from lit_distill.losses.ppo import IMPORTANCE_SAMPLING_LEVELS
from lit_distill.losses.rl import (ADVANTAGE_ESTIMATORS, SCALE_REWARDS, equal_reward_groups, group_advantages,
                                   kl_estimate, masked_mean, reinforce_pp_advantages, rloo_advantages)
from lit_distill.models.loading import ModelSpec
from lit_distill.modules.base import default_optimizer
from lit_distill.modules.rl import OnlineRLModule, completion_forward, concat_rollouts, select_rollout
from lit_distill.optim import SchedulerCallable
from lit_distill.rewards import Reward
from lit_distill.rollout import Rollout, Sampling


class GRPOModule(OnlineRLModule):
    def __init__(self, policy: ModelSpec, rewards: Sequence[Reward], *, reward_weights: Optional[list[float]] = None,
                 reference: Optional[ModelSpec] = None, num_generations: int = 4, beta: float = 0.04,
                 loss_type: str = "dapo", scale_rewards: str = "group", clip_eps: float = 0.2,
                 clip_eps_high: Optional[float] = None, num_iterations: int = 1,
                 mask_truncated_completions: bool = False, importance_sampling_level: str = "token",
                 advantage_estimator: str = "grpo", dynamic_sampling: bool = False, max_sampling_rounds: int = 3,
                 sampling: Sampling = Sampling(),
                 micro_batch_size: Optional[int] = None, max_grad_norm: Optional[float] = 1.0, seed: int = 0,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[SchedulerCallable] = None,
                 save_dir: Optional[str] = None, merge_lora: bool = False):
        """
        Args:
            policy: the trained model; with ``lora`` set and no ``reference``, the reference is its base.
            rewards: reward functions (``lit_distill.rewards``) summed with ``reward_weights``.
            reference: a separate frozen reference; None uses the LoRA base or a frozen copy (none when β = 0).
            num_generations: G, completions per prompt (the batch's prompts × G sequences per step).
            beta: β of the k3 KL penalty to the reference; 0 builds no reference model.
            loss_type: ``grpo``, ``bnpo``, ``dapo`` or ``dr_grpo`` (see ``lit_distill.losses.grpo_loss``).
            scale_rewards: ``group``, ``batch`` or ``none`` (see ``lit_distill.losses.group_advantages``); the
                ``grpo`` estimator only.
            clip_eps: ε of the clipped surrogate.
            clip_eps_high: ε_high, the upper clip (DAPO uses 0.28); None = ``clip_eps``.
            num_iterations: μ, updates per generation round.
            mask_truncated_completions: completions without EOS/stop within ``sampling.max_new_tokens`` do not
                enter the loss.
            importance_sampling_level: ``token`` (GRPO) or ``sequence`` (GSPO, Zheng et al. 2025: one clipped
                length-normalised ratio per completion; pair it with ``loss_type: grpo`` and ``num_iterations`` > 1,
                since at μ = 1 every ratio is 1 and the update equals GRPO's).
            advantage_estimator: ``grpo`` (group mean baseline, scaled per ``scale_rewards``), ``rloo`` (leave-one-out
                baseline, unscaled; Ahmadian et al. 2024) or ``reinforce_pp`` (REINFORCE++, Hu et al. 2025: β is a
                per-token k1 KL penalty in the reward instead of a loss term, and the per-token returns are
                normalised over the whole batch; see ``lit_distill.losses``).
            dynamic_sampling: DAPO's dynamic sampling: drop groups whose rewards are all equal and refill the batch
                from further prompts (see :meth:`rollout_groups`); logs ``dapo/groups_dropped``,
                ``dapo/sampling_rounds`` and ``dapo/groups_short``.
            max_sampling_rounds: the most generation rounds per step with ``dynamic_sampling`` (the first included).
            sampling: how completions are sampled; log-probs use ``sampling.temperature``, and ``dr_grpo``'s
                constant normaliser is ``sampling.max_new_tokens``.
            micro_batch_size: sequences per forward/backward.
            max_grad_norm: gradient clipping per update; None disables.
            seed: base seed of sampling (each rank and step derives its own stream).
        """
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages are relative to the group), got "
                             f"{num_generations}")
        require(beta >= 0, "beta", beta, ">= 0 (the KL coefficient; 0 drops the reference)")
        require(clip_eps > 0, "clip_eps", clip_eps, "> 0")
        require(clip_eps_high is None or clip_eps_high >= clip_eps, "clip_eps_high", clip_eps_high,
                f">= clip_eps ({clip_eps}) or null")
        require(num_iterations >= 1, "num_iterations", num_iterations, ">= 1")
        require(advantage_estimator in ADVANTAGE_ESTIMATORS, "advantage_estimator", advantage_estimator,
                f"one of {ADVANTAGE_ESTIMATORS}")
        require(max_sampling_rounds >= 1, "max_sampling_rounds", max_sampling_rounds, ">= 1")
        require(importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level",
                importance_sampling_level, f"one of {IMPORTANCE_SAMPLING_LEVELS}")
        super().__init__(policy, rewards, reward_weights=reward_weights, reference=reference,
                         needs_reference=beta != 0, sampling=sampling, micro_batch_size=micro_batch_size,
                         max_grad_norm=max_grad_norm, seed=seed, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         save_dir=save_dir, merge_lora=merge_lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "rewards"])

    def on_train_start(self) -> None:
        if self.hparams.dynamic_sampling and isinstance(self.trainer.train_dataloader.dataset, IterableDataset):
            raise ValueError("dynamic_sampling refills from a map-style training dataset (next_prompts); this "
                             "training dataloader streams an IterableDataset")

    def updates_per_rollout(self) -> int:
        return self.hparams.num_iterations

    def sample_groups(self, batch: dict, sampling_round: int = 0) -> tuple[Rollout, Tensor]:
        """G completions of each prompt of ``batch`` (adjacent) and their (B·G,) rewards."""
        generations = self.hparams.num_generations
        rollout = self.sample(batch["prompt_input_ids"].repeat_interleave(generations, 0),
                              batch["prompt_attention_mask"].repeat_interleave(generations, 0),
                              sampling_round=sampling_round)
        prompts, columns = self.batch_columns(batch, repeats=generations)
        return rollout, self.score(prompts, self.decode_completions(rollout), columns)

    def rollout_groups(self, batch: dict) -> tuple[Rollout, Tensor, Tensor]:
        """The step's rollout: its (B·G,) rewards and a (B·G,) bool of the rows that enter the loss.

        Without ``dynamic_sampling`` that is the batch's groups, all trained. With it (DAPO, Yu et al. 2025, §3.2),
        groups whose G rewards are all equal (zero advantage, no signal) are dropped and further prompt batches
        (:meth:`next_prompts`) are sampled until the batch's count of groups is reached or ``max_sampling_rounds``
        rounds are spent; a batch still short is completed with dropped groups whose rows do not enter the loss,
        so every step and rank trains on the same number of sequences. The rollout/ statistics describe the first
        round (the policy on a fresh batch), not the filtered batch.
        """
        hp, generations = self.hparams, self.hparams.num_generations
        rollout, rewards = self.sample_groups(batch)
        equal = equal_reward_groups(rewards, generations)  # (prompts,)
        self.record_rollout(rollout, rewards)
        self.record("grpo/frac_zero_std", equal.float().mean())
        if not hp.dynamic_sampling:
            return rollout, rewards, torch.ones_like(rewards, dtype=torch.bool)
        wanted = equal.numel()
        kept, dropped, rounds, num_dropped = [], [], 1, 0
        while True:
            rows = torch.arange(rewards.numel(), device=rewards.device).view(-1, generations)  # (prompts, G)
            kept.append((select_rollout(rollout, rows[~equal].view(-1)), rewards[rows[~equal].view(-1)]))
            dropped.append((select_rollout(rollout, rows[equal].view(-1)), rewards[rows[equal].view(-1)]))
            num_dropped += int(equal.sum())
            num_kept = sum(part[1].numel() for part in kept) // generations
            if num_kept >= wanted or rounds == hp.max_sampling_rounds:
                break
            rollout, rewards = self.sample_groups(self.next_prompts(rounds), sampling_round=rounds)
            equal = equal_reward_groups(rewards, generations)
            rounds += 1
        short = max(wanted - num_kept, 0)
        parts = kept + dropped  # kept groups first: the first `wanted` groups are all kept ones when enough exist
        rollout = select_rollout(concat_rollouts([part[0] for part in parts], self.tokenizer.pad_token_id),
                                 slice(0, wanted * generations))
        rewards = torch.cat([part[1] for part in parts])[:wanted * generations]
        trainable = torch.arange(wanted * generations, device=rewards.device) < (wanted - short) * generations
        self.record("dapo/groups_dropped", torch.tensor(float(num_dropped)))
        self.record("dapo/sampling_rounds", torch.tensor(float(rounds)))
        self.record("dapo/groups_short", torch.tensor(float(short)))
        return rollout, rewards, trainable

    def advantages(self, rewards: Tensor, mask: Tensor, old_logprobs: Optional[Tensor],
                   ref_logprobs: Optional[Tensor]) -> Tensor:
        """(B·G,) sequence advantages (``grpo``, ``rloo``) or (B·G, N) token advantages (``reinforce_pp``)."""
        hp = self.hparams
        if hp.advantage_estimator == "grpo":
            return group_advantages(rewards, hp.num_generations, hp.scale_rewards)[0]
        if hp.advantage_estimator == "rloo":
            return rloo_advantages(rewards, hp.num_generations)[0]
        kl = None
        if hp.beta:
            kl = kl_estimate(old_logprobs, ref_logprobs, "k1") * mask  # REINFORCE++'s per-token penalty
            self.record("rollout/kl", kl.sum(-1).mean())  # per-sequence KL, averaged (as PPO's)
        return reinforce_pp_advantages(rewards, mask, kl, hp.beta)

    def training_step(self, batch, batch_idx):
        hp, sampling = self.hparams, self.sampling
        start = time.perf_counter()
        with torch.no_grad():
            rollout, rewards, trainable = self.rollout_groups(batch)
            mask = rollout.completion_mask.float() * trainable.float()[:, None]  # (B·G, N)
            if hp.mask_truncated_completions:
                mask = mask * (~rollout.truncated).float()[:, None]
            ref_logprobs = self.reference_logprobs(rollout) if hp.beta else None
            micro = self.micro_batches(mask.size(0))
            old_logprobs = None
            # REINFORCE++'s KL penalty needs the sampling policy's log-probs before the first update.
            if hp.num_iterations > 1 or (hp.advantage_estimator == "reinforce_pp" and hp.beta):
                old_logprobs = torch.cat([completion_forward(self.model, rollout.sequences[rows],
                                                             rollout.attention_mask[rows], rollout.prompt_length,
                                                             sampling.temperature).logprobs for rows in micro])
            advantages = self.advantages(rewards, mask, old_logprobs, ref_logprobs)
            denominators = step_denominators([mask[rows] for rows in micro], hp.loss_type, sampling.max_new_tokens)
            if hp.loss_type != "bnpo":  # bnpo: each rank's own micro-batch means, averaged by DDP (TRL's)
                # Nothing to average (all masked): the numerators are 0.
                denominators = [self.global_sum(denominators[0]).clamp(min=1)] * len(micro)
        self.record("perf/rollout_s", torch.tensor(time.perf_counter() - start))
        loss_beta = 0.0 if hp.advantage_estimator == "reinforce_pp" else hp.beta  # REINFORCE++: KL is in the reward

        entropy = "detached" if self.logs_this_step else "none"  # a (B·G, N, V) log-softmax, for the log only
        for _ in range(hp.num_iterations):
            step_loss = torch.zeros((), device=self.device)
            for rows, denominator in zip(micro, denominators):
                forward = completion_forward(self.model, rollout.sequences[rows], rollout.attention_mask[rows],
                                             rollout.prompt_length, sampling.temperature, entropy=entropy)
                old = old_logprobs[rows] if old_logprobs is not None else forward.logprobs.detach()
                numerator, _, stats = grpo_loss(
                    forward.logprobs, old, advantages[rows].to(self.device), mask[rows], loss_type=hp.loss_type,
                    clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high, beta=loss_beta,
                    ref_logprobs=ref_logprobs[rows] if ref_logprobs is not None else None,
                    max_completion_length=sampling.max_new_tokens,
                    importance_sampling_level=hp.importance_sampling_level)
                self.backward_share(numerator, denominator, across_ranks=hp.loss_type != "bnpo")
                step_loss += numerator.detach() / denominator
                self.record("grpo/kl", stats.kl)
                self.record("grpo/clip_ratio", stats.clip_ratio)
                self.record("grpo/approx_kl", stats.approx_kl)
                if forward.entropy is not None:
                    self.record("grpo/entropy", masked_mean(forward.entropy, mask[rows]))
            self.optimizer_step()
            self.record("grpo/loss", step_loss)
        self.log_records()
