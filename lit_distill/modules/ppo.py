"""PPO for language models (Ouyang et al. 2022; the "N implementation details of RLHF with PPO", Huang et al. 2024).

One training step = one rollout and several updates:

1. The policy samples a completion for each prompt of the batch (eval mode, KV cache, per-rank seed).
2. Rewards score the decoded completions; a missing EOS can be penalised.
3. Per-token rewards: ``−kl_coef · KL_t`` (estimator k1 or k3, policy vs reference) on every completion token,
   plus the score on the last real token.
4. Values V(s_t) from a value head on the policy's final hidden states (or on a separate value model), then
   GAE(γ, λ) advantages, whitened over the rollout, and returns = advantages + values.
5. ``ppo_epochs`` passes over the rollout in ``num_minibatches`` minibatches (one optimizer step each, their order
   shuffled per epoch), each micro-batched: clipped surrogate + ``vf_coef`` · clipped value loss
   − ``entropy_coef`` · entropy, every term a token mean over the minibatch on all ranks; optionally stopped early
   once approx_kl exceeds ``target_kl`` (cleanrl).
6. With ``kl_target``, the KL coefficient adapts to the rollout's KL for the next rollout (Ziegler et al. 2019).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lit_distill.checks import require
from lit_distill.losses.ppo import adaptive_kl_coef, clipped_policy_loss, clipped_value_loss
from lit_distill.losses.rl import KL_ESTIMATORS, gae, kl_estimate, masked_mean, masked_sum, masked_var, masked_whiten
from lit_distill.models.heads import ScalarHead, final_hidden_states
from lit_distill.models.loading import ModelSpec, build_model, load_tokenizer
from lit_distill.modules.base import default_optimizer
from lit_distill.modules.rl import OnlineRLModule, completion_forward
from lit_distill.optim import SchedulerCallable
from lit_distill.rewards import Reward
from lit_distill.rollout import Sampling


class PPOModule(OnlineRLModule):
    eval_modules = (*OnlineRLModule.eval_modules, "value_model")

    def __init__(self, policy: ModelSpec, rewards: Sequence[Reward], *, reward_weights: Optional[list[float]] = None,
                 reference: Optional[ModelSpec] = None, value_model: Optional[ModelSpec] = None,
                 kl_coef: float = 0.05, kl_estimator: str = "k1", missing_eos_penalty: Optional[float] = None,
                 gamma: float = 1.0, lam: float = 0.95, whiten_advantages: bool = True, ppo_epochs: int = 4,
                 num_minibatches: int = 1, clip_eps: float = 0.2, clip_range_value: Optional[float] = 0.2,
                 vf_coef: float = 0.1, entropy_coef: float = 0.0, kl_target: Optional[float] = None,
                 kl_horizon: int = 10000, target_kl: Optional[float] = None, sampling: Sampling = Sampling(),
                 micro_batch_size: Optional[int] = None, max_grad_norm: Optional[float] = 1.0, seed: int = 0,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[SchedulerCallable] = None,
                 save_dir: Optional[str] = None, merge_lora: bool = False):
        """
        Args:
            policy: the trained model; with ``lora`` set and no ``reference``, the reference is its base.
            rewards: reward functions (``lit_distill.rewards``) summed with ``reward_weights`` into the score.
            reference: a separate frozen reference; None uses the LoRA base or a frozen copy of the policy.
            value_model: a separate backbone for the value head; None puts the head on the policy's hidden states.
            kl_coef: β of the per-token KL penalty in the reward (0: no reference model is built).
            kl_estimator: ``k1`` (log π − log π_ref, the classic RLHF penalty) or ``k3`` (non-negative).
            missing_eos_penalty: subtracted from the score of completions that hit ``sampling.max_new_tokens``
                without EOS.
            gamma: GAE discount γ.
            lam: GAE λ.
            whiten_advantages: normalise advantages over the rollout (masked mean/variance).
            ppo_epochs: passes over each rollout.
            num_minibatches: optimizer steps per pass (the rollout is split into this many minibatches).
            clip_eps: ε of the clipped surrogate.
            clip_range_value: clip of the value update around the rollout's values; None disables.
            vf_coef: weight of the value loss.
            entropy_coef: weight of the entropy bonus.
            kl_target: adaptive KL control (Ziegler et al. 2019): after each rollout ``kl_coef`` moves towards the
                value that keeps the rollout's per-sequence KL at this target (see
                ``lit_distill.losses.adaptive_kl_coef``); logged as ``ppo/kl_coef``, saved in checkpoints. None keeps
                ``kl_coef`` fixed.
            kl_horizon: the controller's horizon H (in samples).
            target_kl: early stop (cleanrl): after each PPO epoch, the remaining epochs of the rollout are skipped
                when the approx_kl of the epoch's last minibatch exceeds this; logs ``ppo/updates`` (optimizer steps
                done per rollout) and ``ppo/early_stopped``. Skipped updates do not count towards
                ``trainer.max_steps``.
            sampling: how completions are sampled; log-probs use ``sampling.temperature``.
            micro_batch_size: sequences per forward/backward (gradient accumulation inside a minibatch).
            max_grad_norm: gradient clipping per update; None disables.
            seed: base seed of sampling (each rank and step derives its own stream).
        """
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        require(kl_coef >= 0, "kl_coef", kl_coef, ">= 0")
        require(0 <= gamma <= 1 and 0 <= lam <= 1, "gamma and lam", (gamma, lam), "in [0, 1]")
        require(ppo_epochs >= 1 and num_minibatches >= 1, "ppo_epochs and num_minibatches",
                (ppo_epochs, num_minibatches), ">= 1")
        require(clip_eps > 0, "clip_eps", clip_eps, "> 0")
        require(clip_range_value is None or clip_range_value > 0, "clip_range_value", clip_range_value, "> 0 or null")
        require(kl_target is None or (kl_target > 0 and kl_coef > 0), "kl_target", kl_target,
                "> 0 with kl_coef > 0, or null")
        require(kl_horizon > 0, "kl_horizon", kl_horizon, "> 0")
        require(target_kl is None or target_kl > 0, "target_kl", target_kl, "> 0 or null")
        require(vf_coef >= 0 and entropy_coef >= 0, "vf_coef and entropy_coef", (vf_coef, entropy_coef), ">= 0")
        super().__init__(policy, rewards, reward_weights=reward_weights, reference=reference,
                         needs_reference=kl_coef > 0, sampling=sampling, micro_batch_size=micro_batch_size,
                         max_grad_norm=max_grad_norm, seed=seed, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         save_dir=save_dir, merge_lora=merge_lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "rewards"])
        self.value_model = None
        if value_model is not None:
            value_tokenizer = load_tokenizer(value_model.tokenizer or value_model.name_or_path)
            if value_tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ValueError("value_model: its tokenizer differs from the policy's; the value model reads the "
                                 "policy's token ids")
            self.value_model = build_model(value_model, value_tokenizer).eval()
        hidden_size = (self.value_model or self.model).get_output_embeddings().in_features
        self.value_head = ScalarHead(hidden_size)
        self.num_minibatches = num_minibatches
        self.kl_coef = kl_coef  # β of the next rollout: moved by the adaptive controller, kept in checkpoints

    def trainable_parameters(self):
        extra = [p for p in self.value_model.parameters() if p.requires_grad] if self.value_model is not None else []
        return super().trainable_parameters() + extra + list(self.value_head.parameters())

    def updates_per_rollout(self) -> int:
        return self.hparams.ppo_epochs * self.hparams.num_minibatches

    def values(self, forward, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
        """(B, N) V(s_t) for each completion token t, from the policy's hidden states or the value model's."""
        hidden = forward.hidden_states
        if self.value_model is not None:
            num_new = sequences.size(1) - prompt_length
            hidden = final_hidden_states(self.value_model, sequences, attention_mask)[:, -num_new - 1:-1]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    # ---- experience ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_experience(self, batch: dict) -> dict:
        hp = self.hparams
        rollout = self.sample(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        prompts, columns = self.batch_columns(batch)
        scores = self.score(prompts, self.decode_completions(rollout), columns)  # (B,)
        if hp.missing_eos_penalty is not None:
            scores = scores - hp.missing_eos_penalty * rollout.truncated.float()
        mask = rollout.completion_mask.float()  # (B, N)

        old_logprobs, old_values = [], []
        for rows in self.micro_batches(mask.size(0)):
            sequences, attention = rollout.sequences[rows], rollout.attention_mask[rows]
            forward = completion_forward(self.model, sequences, attention, rollout.prompt_length,
                                         self.sampling.temperature)
            old_logprobs.append(forward.logprobs)
            old_values.append(self.values(forward, sequences, attention, rollout.prompt_length))
        old_logprobs, old_values = torch.cat(old_logprobs), torch.cat(old_values) * mask

        rewards = torch.zeros_like(mask)
        if hp.kl_coef > 0:
            kl = kl_estimate(old_logprobs, self.reference_logprobs(rollout), hp.kl_estimator) * mask
            rewards = rewards - self.kl_coef * kl
            self.record("rollout/kl", kl.sum(-1).mean())  # per-sequence KL, averaged
            self.record("ppo/kl_coef", torch.tensor(self.kl_coef))
            if hp.kl_target is not None:
                sequences = self.global_sum(torch.tensor(float(mask.size(0))))
                mean_kl = (self.global_sum(kl.sum()) / sequences).item()
                self.kl_coef = adaptive_kl_coef(self.kl_coef, mean_kl, hp.kl_target, hp.kl_horizon,
                                                int(sequences.item()))
        last = (rollout.completion_lengths - 1).clamp(min=0)  # (B,) index of the last real completion token
        rewards[torch.arange(mask.size(0)), last] += scores
        advantages, returns = gae(rewards, old_values, mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        self.record_rollout(rollout, scores)
        self.record("ppo/explained_variance",
                    1 - masked_var(returns - old_values, mask) / masked_var(returns, mask).clamp(min=1e-8))
        return {"rollout": rollout, "mask": mask, "old_logprobs": old_logprobs, "old_values": old_values,
                "advantages": advantages, "returns": returns}

    # ---- updates ------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        start = time.perf_counter()
        experience = self.make_experience(batch)
        mask = experience["mask"]
        self.record("perf/rollout_s", torch.tensor(time.perf_counter() - start))
        minibatches = self.minibatches(mask.size(0))
        # The same order on every rank (DDP steps together); minibatch contents stay fixed (see modules/rl.py).
        order = torch.Generator().manual_seed(hp.seed + self.global_step)
        updates = 0
        for _ in range(hp.ppo_epochs):
            for index in torch.randperm(len(minibatches), generator=order).tolist():
                # At least 1: a minibatch without tokens has a zero loss sum anyway.
                num_tokens = self.global_sum(sum(mask[rows].sum() for rows in minibatches[index])).clamp(min=1)
                kl_sum = torch.zeros((), device=self.device)
                for rows in minibatches[index]:
                    loss, approx_kl = self.minibatch_loss(experience, rows)
                    self.backward_share(loss, num_tokens)
                    kl_sum += approx_kl * mask[rows].sum()
                self.optimizer_step()
                updates += 1
            # cleanrl's early stop: the last minibatch's approx_kl (a token mean over all ranks, so every rank stops
            # at the same epoch).
            if hp.target_kl is not None and (self.global_sum(kl_sum) / num_tokens).item() > hp.target_kl:
                break
        self.record("ppo/updates", torch.tensor(float(updates)))
        if hp.target_kl is not None:
            self.record("ppo/early_stopped", torch.tensor(float(updates < self.updates_per_rollout())))
        self.log_records()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_coef = checkpoint.get("ppo_kl_coef", self.hparams.kl_coef)

    def minibatch_loss(self, experience: dict, rows: slice) -> tuple[Tensor, Tensor]:
        """Token-summed PPO loss of one micro-batch (the caller divides by the minibatch's token count) and its
        detached approx_kl (a token mean)."""
        hp, rollout = self.hparams, experience["rollout"]
        sequences, attention, mask = rollout.sequences[rows], rollout.attention_mask[rows], experience["mask"][rows]
        forward = completion_forward(self.model, sequences, attention, rollout.prompt_length, self.sampling.temperature,
                                     entropy="differentiable" if hp.entropy_coef
                                     else "detached" if self.logs_this_step else "none")
        values = self.values(forward, sequences, attention, rollout.prompt_length)
        policy_loss, policy_stats = clipped_policy_loss(forward.logprobs, experience["old_logprobs"][rows],
                                                        experience["advantages"][rows], mask, clip_eps=hp.clip_eps)
        value_loss, value_stats = clipped_value_loss(values, experience["old_values"][rows],
                                                     experience["returns"][rows], mask,
                                                     clip_range=hp.clip_range_value)
        loss = policy_loss + hp.vf_coef * value_loss
        if hp.entropy_coef:
            loss = loss - hp.entropy_coef * masked_sum(forward.entropy, mask)
        count = mask.sum().clamp(min=1)
        self.record("ppo/policy_loss", policy_loss.detach() / count)
        self.record("ppo/value_loss", value_loss.detach() / count)
        self.record("ppo/approx_kl", policy_stats.approx_kl)
        self.record("ppo/clipfrac", policy_stats.clipfrac)
        self.record("ppo/ratio", policy_stats.ratio_mean)
        self.record("ppo/value_clipfrac", value_stats.clipfrac)
        if forward.entropy is not None:
            self.record("ppo/entropy", masked_mean(forward.entropy.detach(), mask))
        return loss, policy_stats.approx_kl
