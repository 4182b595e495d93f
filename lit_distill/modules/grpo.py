"""GRPO (Shao et al. 2024) with the later fixes as options: DAPO's token-level loss and clip-higher, Dr. GRPO's
unscaled advantages and constant normaliser, masking of truncated completions.

One training step = one generation round and ``num_iterations`` updates (μ in the paper):

1. Each prompt of the batch is completed ``num_generations`` (G) times by the policy (per-rank seed).
2. Rewards score the completions; each completion's advantage is its reward minus its group's mean, scaled per
   ``scale_rewards``; a group whose rewards are all equal gets advantage 0.
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

from lit_distill.checks import require
from lit_distill.losses.grpo import GRPO_LOSS_TYPES, grpo_loss, step_denominators
from lit_distill.losses.ppo import IMPORTANCE_SAMPLING_LEVELS
from lit_distill.losses.rl import SCALE_REWARDS, group_advantages, masked_mean
from lit_distill.models.loading import ModelSpec
from lit_distill.modules.base import default_optimizer
from lit_distill.modules.rl import OnlineRLModule, completion_forward
from lit_distill.optim import SchedulerCallable
from lit_distill.rewards import Reward
from lit_distill.rollout import Sampling


class GRPOModule(OnlineRLModule):
    def __init__(self, policy: ModelSpec, rewards: Sequence[Reward], *, reward_weights: Optional[list[float]] = None,
                 reference: Optional[ModelSpec] = None, num_generations: int = 4, beta: float = 0.04,
                 loss_type: str = "dapo", scale_rewards: str = "group", clip_eps: float = 0.2,
                 clip_eps_high: Optional[float] = None, num_iterations: int = 1,
                 mask_truncated_completions: bool = False, importance_sampling_level: str = "token",
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
            scale_rewards: ``group``, ``batch`` or ``none`` (see ``lit_distill.losses.group_advantages``).
            clip_eps: ε of the clipped surrogate.
            clip_eps_high: ε_high, the upper clip (DAPO uses 0.28); None = ``clip_eps``.
            num_iterations: μ, updates per generation round.
            mask_truncated_completions: completions without EOS/stop within ``sampling.max_new_tokens`` do not
                enter the loss.
            importance_sampling_level: ``token`` (GRPO) or ``sequence`` (GSPO, Zheng et al. 2025: one clipped
                length-normalised ratio per completion; pair it with ``loss_type: grpo`` and ``num_iterations`` > 1,
                since at μ = 1 every ratio is 1 and the update equals GRPO's).
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
        require(importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level",
                importance_sampling_level, f"one of {IMPORTANCE_SAMPLING_LEVELS}")
        super().__init__(policy, rewards, reward_weights=reward_weights, reference=reference,
                         needs_reference=beta != 0, sampling=sampling, micro_batch_size=micro_batch_size,
                         max_grad_norm=max_grad_norm, seed=seed, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         save_dir=save_dir, merge_lora=merge_lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "rewards"])

    def updates_per_rollout(self) -> int:
        return self.hparams.num_iterations

    def training_step(self, batch, batch_idx):
        hp, sampling = self.hparams, self.sampling
        start = time.perf_counter()
        with torch.no_grad():
            rollout = self.sample(batch["prompt_input_ids"].repeat_interleave(hp.num_generations, 0),
                                  batch["prompt_attention_mask"].repeat_interleave(hp.num_generations, 0))
            prompts, columns = self.batch_columns(batch, repeats=hp.num_generations)
            rewards = self.score(prompts, self.decode_completions(rollout), columns)  # (B·G,)
            advantages, group_stats = group_advantages(rewards, hp.num_generations, hp.scale_rewards)
            mask = rollout.completion_mask.float()  # (B·G, N)
            if hp.mask_truncated_completions:
                mask = mask * (~rollout.truncated).float()[:, None]
            ref_logprobs = self.reference_logprobs(rollout) if hp.beta else None
            micro = self.micro_batches(mask.size(0))
            old_logprobs = None
            if hp.num_iterations > 1:
                old_logprobs = torch.cat([completion_forward(self.model, rollout.sequences[rows],
                                                             rollout.attention_mask[rows], rollout.prompt_length,
                                                             sampling.temperature).logprobs for rows in micro])
            denominators = step_denominators([mask[rows] for rows in micro], hp.loss_type, sampling.max_new_tokens)
            if hp.loss_type != "bnpo":  # bnpo: each rank's own micro-batch means, averaged by DDP (TRL's)
                # Nothing to average (all masked): the numerators are 0.
                denominators = [self.global_sum(denominators[0]).clamp(min=1)] * len(micro)
        self.record_rollout(rollout, rewards)
        self.record("grpo/frac_zero_std", group_stats.frac_zero_std)
        self.record("perf/rollout_s", torch.tensor(time.perf_counter() - start))

        entropy = "detached" if self.logs_this_step else "none"  # a (B·G, N, V) log-softmax, for the log only
        for _ in range(hp.num_iterations):
            step_loss = torch.zeros((), device=self.device)
            for rows, denominator in zip(micro, denominators):
                forward = completion_forward(self.model, rollout.sequences[rows], rollout.attention_mask[rows],
                                             rollout.prompt_length, sampling.temperature, entropy=entropy)
                old = old_logprobs[rows] if old_logprobs is not None else forward.logprobs.detach()
                numerator, _, stats = grpo_loss(
                    forward.logprobs, old, advantages[rows].to(self.device), mask[rows], loss_type=hp.loss_type,
                    clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high, beta=hp.beta,
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
