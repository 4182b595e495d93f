"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback").

One training step = one rollout and one update:

1. The policy samples G completions of every prompt of the batch (G = 2 in the paper and in TRL).
2. Reward functions, or a reward model (``lit_distill.rewards.RewardModelScore``), score them; a missing EOS can
   be penalised. Each prompt's highest- and lowest-scored completion form a preference pair (best-vs-worst of G,
   as iterative-DPO recipes do for G > 2; ``lit_distill.losses.best_worst_pairs``).
3. ``dpo_loss`` on the pairs' log-probs under the policy and the frozen reference, a mean over the step's decisive
   pairs on all ranks.

A pair whose completions scored the same carries no preference: it stays in the rollout, so every rank runs the
same forwards, but with weight 0 (``online_dpo/decisive_frac`` logs the share that trained). TRL instead prefers
the first completion of a tie.

Log-probs are those of the sampling distribution, ``log_softmax(logits / sampling.temperature)``, for the policy
and the reference alike, as in GRPO and PPO; ``ipo`` uses their per-token means, as ``DPOModule`` does.

Shape legend: B prompts, G completions each, N completion length; a pair rollout holds 2B rows, chosen and
rejected of each prompt adjacent.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lit_distill.checks import require
from lit_distill.losses import DPO_LOSS_TYPES, best_worst_pairs, dpo_loss, masked_mean
from lit_distill.models.loading import ModelSpec
from lit_distill.modules.base import default_optimizer
from lit_distill.modules.rl import OnlineRLModule, completion_forward, select_rollout
from lit_distill.optim import SchedulerCallable
from lit_distill.rewards import Reward
from lit_distill.rollout import Rollout, Sampling


class OnlineDPOModule(OnlineRLModule):
    def __init__(self, policy: ModelSpec, rewards: Sequence[Reward], *, reward_weights: Optional[list[float]] = None,
                 reference: Optional[ModelSpec] = None, num_generations: int = 2, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, missing_eos_penalty: Optional[float] = None,
                 sampling: Sampling = Sampling(), micro_batch_size: Optional[int] = None,
                 max_grad_norm: Optional[float] = 1.0, seed: int = 0,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[SchedulerCallable] = None,
                 save_dir: Optional[str] = None, merge_lora: bool = False):
        """
        Args:
            policy: the trained model; with ``lora`` set and no ``reference``, the reference is its base.
            rewards: reward functions or reward models (``lit_distill.rewards``), summed with ``reward_weights``,
                that rank the completions.
            reference: a separate frozen reference; None uses the LoRA base or a frozen copy of the policy.
            num_generations: G ≥ 2 completions per prompt; the best and the worst make the pair.
            beta: DPO's β.
            loss_type: one of ``DPO_LOSS_TYPES`` (see ``lit_distill.losses.dpo_loss``).
            label_smoothing: ε of conservative / robust DPO.
            missing_eos_penalty: subtracted from the score of completions that hit ``sampling.max_new_tokens``
                before ranking (TRL's ``missing_eos_penalty``).
            sampling: how completions are sampled; log-probs use ``sampling.temperature``.
            micro_batch_size: sequences per forward/backward, even (a pair's two sequences share a micro-batch).
            max_grad_norm: gradient clipping per update; None disables.
            seed: base seed of sampling (each rank and step derives its own stream).
        """
        require(num_generations >= 2, "num_generations", num_generations, ">= 2 (a pair needs two completions)")
        require(loss_type in DPO_LOSS_TYPES, "loss_type", loss_type, f"one of {DPO_LOSS_TYPES}")
        require(beta > 0, "beta", beta, "> 0")
        require(0 <= label_smoothing < 0.5 and (label_smoothing == 0 or loss_type in ("sigmoid", "robust")),
                "label_smoothing", label_smoothing, "in [0, 0.5), and 0 unless loss_type is sigmoid or robust")
        require(micro_batch_size is None or micro_batch_size % 2 == 0, "micro_batch_size", micro_batch_size,
                "even or null (chosen and rejected of a pair go through one forward)")
        super().__init__(policy, rewards, reward_weights=reward_weights, reference=reference, needs_reference=True,
                         sampling=sampling, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm,
                         seed=seed, optimizer=optimizer, lr_scheduler=lr_scheduler, save_dir=save_dir,
                         merge_lora=merge_lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "rewards"])

    def updates_per_rollout(self) -> int:
        return 1

    def sequence_logps(self, token_logprobs: Tensor, mask: Tensor) -> Tensor:
        """(rows,) sequence log-probs from (rows, N) token log-probs: sums, or per-token means for ``ipo``."""
        sums = (token_logprobs * mask).sum(-1)
        return sums / mask.sum(-1).clamp(min=1) if self.hparams.loss_type == "ipo" else sums

    @torch.no_grad()
    def sample_pairs(self, batch: dict) -> tuple[Rollout, Tensor, Tensor]:
        """The step's pair rollout (2B rows: chosen, rejected of each prompt), its (2B,) scores and (B,) decisive."""
        hp, generations = self.hparams, self.hparams.num_generations
        rollout = self.sample(batch["prompt_input_ids"].repeat_interleave(generations, 0),
                              batch["prompt_attention_mask"].repeat_interleave(generations, 0))
        prompts, columns = self.batch_columns(batch, repeats=generations)
        scores = self.score(prompts, self.decode_completions(rollout), columns)  # (B·G,)
        if hp.missing_eos_penalty is not None:
            scores = scores - hp.missing_eos_penalty * rollout.truncated.float()
        self.record_rollout(rollout, scores)
        chosen, rejected, decisive = best_worst_pairs(scores, generations)
        rows = torch.stack([chosen, rejected], 1).view(-1)  # (2B,) c0 r0 c1 r1 …
        return select_rollout(rollout, rows), scores[rows], decisive

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        start = time.perf_counter()
        with torch.no_grad():
            pairs, scores, decisive = self.sample_pairs(batch)
            mask = pairs.completion_mask.float()  # (2B, N)
            reference = self.sequence_logps(self.reference_logprobs(pairs), mask)  # (2B,)
            weights = decisive.float()  # (B,)
            num_decisive = self.global_sum(weights.sum()).clamp(min=1)  # nothing decisive: every numerator is 0
        self.record("perf/rollout_s", torch.tensor(time.perf_counter() - start))

        policy, losses = [], []
        for rows in self.micro_batches(mask.size(0)):  # even slices: whole pairs
            forward = completion_forward(self.model, pairs.sequences[rows], pairs.attention_mask[rows],
                                         pairs.prompt_length, self.sampling.temperature)
            logps = self.sequence_logps(forward.logprobs, mask[rows])  # (2b,)
            pair_losses, _ = dpo_loss(logps[0::2], logps[1::2], reference[rows][0::2], reference[rows][1::2],
                                      beta=hp.beta, loss_type=hp.loss_type, label_smoothing=hp.label_smoothing,
                                      reduction="none")
            pair_weights = weights[rows.start // 2:rows.stop // 2]
            self.backward_share((pair_losses * pair_weights).sum(), num_decisive)
            policy.append(logps.detach())
            losses.append(pair_losses.detach())
        self.optimizer_step()
        self.record_pairs(torch.cat(policy), reference, torch.cat(losses), scores, decisive)
        self.log_records()

    def record_pairs(self, policy: Tensor, reference: Tensor, losses: Tensor, scores: Tensor, decisive: Tensor) -> None:
        """This rank's step statistics: the loss, DPO's implicit rewards and log-probs over the decisive pairs (as
        ``DPOModule`` logs them), the rankers' scores of chosen and rejected, and the pairs' KL to the reference."""
        self.record("online_dpo/loss", masked_mean(losses, decisive.float()))
        self.record("online_dpo/decisive_frac", decisive.float().mean())
        self.record("online_dpo/kl", (policy - reference).mean())  # per-sequence log-ratio (per token for ipo)
        self.record("online_dpo/score_chosen", scores[0::2].mean())
        self.record("online_dpo/score_rejected", scores[1::2].mean())
        if not decisive.any():
            return
        _, stats = dpo_loss(policy[0::2][decisive], policy[1::2][decisive], reference[0::2][decisive],
                            reference[1::2][decisive], beta=self.hparams.beta, loss_type=self.hparams.loss_type,
                            label_smoothing=self.hparams.label_smoothing)
        self.record("dpo/rewards_chosen", stats.rewards_chosen.mean())
        self.record("dpo/rewards_rejected", stats.rewards_rejected.mean())
        self.record("dpo/accuracy", stats.accuracy)
        self.record("dpo/margin", stats.margin.mean())
        self.record("dpo/logps_chosen", policy[0::2][decisive].mean())
        self.record("dpo/logps_rejected", policy[1::2][decisive].mean())
