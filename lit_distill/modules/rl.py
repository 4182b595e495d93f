"""What PPO and GRPO share: sampling completions of a prompt batch, scoring them with reward functions, reference
log-probs for the KL term, and manual optimisation over several updates per rollout.

Shape legend: B sequences of a rollout, P prompt length, N completion length, T = P + N, H hidden size.

Every rollout is cut into micro-batches once (contiguous slices, ``micro_batch_size`` sequences each). Log-probs
recorded before the first update and those of the updates come from the same forward on the same slice, so at
the first update (or with lr = 0) the probability ratio is exactly 1, not 1 ± rounding.

Lightning's manual optimisation counts one ``trainer.global_step`` per optimizer step, so ``trainer.max_steps``
counts updates (rollouts × updates per rollout), and the LR schedule spans that many steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Literal, Optional, Sequence

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric

from lit_distill.checks import require
from lit_distill.losses.logprobs import token_logprobs
from lit_distill.models.heads import forward_with_hidden_states
from lit_distill.models.loading import ModelSpec, build_model, build_reference, load_tokenizer
from lit_distill.modules.base import CausalLMModule, default_optimizer
from lit_distill.optim import SchedulerCallable
from lit_distill.rewards import Reward, WeightedRewards
from lit_distill.rollout import Rollout, Sampling, rollout_generator
from lit_distill.rollout.sampling import logits_to_keep_kwargs, seeded_generator

PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask")


@dataclass
class CompletionForward:
    """One forward pass over rollout sequences, restricted to the positions that predict completion tokens.

    Attributes:
        logprobs: (B, N) fp32 log-probs of the completion tokens at the sampling temperature.
        entropy: (B, N) fp32 entropy of the tempered next-token distribution, when asked for.
        hidden_states: (B, N, H) hidden states entering the output head at those positions.
    """

    logprobs: Tensor
    entropy: Optional[Tensor]
    hidden_states: Tensor


def completion_forward(model: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_length: int,
                       temperature: float, entropy: Literal["none", "detached", "differentiable"] = "none"
                       ) -> CompletionForward:
    """Forward ``sequences`` (B, T) through a causal LM and keep what RL losses need on the N completion tokens.

    The entropy costs a full (B, N, V) log-softmax, so it is computed only when asked for: ``"detached"`` for
    logging, ``"differentiable"`` for an entropy bonus.
    """
    num_new = sequences.size(1) - prompt_length
    output, hidden_states = forward_with_hidden_states(model, sequences, attention_mask,
                                                       **logits_to_keep_kwargs(model, num_new + 1))
    # Position t predicts token t + 1: the N completion tokens need positions P - 1 .. T - 2.
    logits = output.logits[:, -num_new - 1:-1]  # (B, N, V)
    hidden_states = hidden_states[:, -num_new - 1:-1]  # (B, N, H)
    completion_mask = attention_mask[:, prompt_length:]
    logprobs = token_logprobs(logits, sequences[:, prompt_length:], temperature).masked_fill(completion_mask == 0, 0)
    token_entropy = None
    if entropy != "none":
        with torch.set_grad_enabled(entropy == "differentiable" and torch.is_grad_enabled()):
            log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
            token_entropy = -(log_p.exp() * log_p).sum(-1)  # (B, N)
    return CompletionForward(logprobs, token_entropy, hidden_states)


def select_rollout(rollout: Rollout, rows: Tensor) -> Rollout:
    """The rows ``rows`` (an index tensor, bool tensor or slice over B) of a rollout."""
    return replace(rollout, sequences=rollout.sequences[rows], attention_mask=rollout.attention_mask[rows],
                   completion_mask=rollout.completion_mask[rows], logprobs=rollout.logprobs[rows],
                   finish_reason=rollout.finish_reason[rows])


def concat_rollouts(rollouts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts of different prompt lengths P_k and completion lengths N_k: prompts are left-padded to the
    longest P and completions right-padded to the longest N (masked, so every forward and loss is unchanged)."""
    prompt_length = max(r.prompt_length for r in rollouts)
    width = max(r.completion_mask.size(1) for r in rollouts)

    def pad(r: Rollout) -> tuple[Tensor, ...]:
        left, right = prompt_length - r.prompt_length, width - r.completion_mask.size(1)
        return (F.pad(r.sequences, (left, right), value=pad_token_id),  # (B_k, P + N)
                F.pad(r.attention_mask, (left, right)), F.pad(r.completion_mask, (0, right)),
                F.pad(r.logprobs, (0, right)))

    sequences, attention_mask, completion_mask, logprobs = (torch.cat(parts) for parts in zip(*map(pad, rollouts)))
    return Rollout(sequences, attention_mask, completion_mask, logprobs,
                   torch.cat([r.finish_reason for r in rollouts]), prompt_length)


class OnlineRLModule(CausalLMModule):
    """Base of ``PPOModule`` and ``GRPOModule``: subclasses implement ``training_step`` with the helpers below."""

    data_task = "prompts"  # what an HFDataModule serves this module

    frozen_modules = ("reference", "rewards")
    # Dropout stays off in every model: a stochastic forward would make the scored policy differ from the sampling
    # one (ratios != 1 at the first update) and bias the KL term.
    eval_modules = ("model", "reference", "rewards")

    def __init__(self, policy: ModelSpec, rewards: Sequence[Reward], *, reward_weights: Optional[list[float]] = None,
                 reference: Optional[ModelSpec] = None, needs_reference: bool = True,
                 sampling: Sampling = Sampling(), micro_batch_size: Optional[int] = None,
                 max_grad_norm: Optional[float] = 1.0, seed: int = 0,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[SchedulerCallable] = None,
                 save_dir: Optional[str] = None, merge_lora: bool = False):
        """Subclasses document the arguments; ``needs_reference`` says whether to build the reference (a KL
        coefficient of 0 needs none). Subclasses call ``save_hyperparameters`` themselves."""
        require(micro_batch_size is None or micro_batch_size >= 1, "micro_batch_size", micro_batch_size,
                ">= 1 or null")
        require(max_grad_norm is None or max_grad_norm > 0, "max_grad_norm", max_grad_norm, "> 0 or null")
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, save_dir=save_dir, merge_lora=merge_lora)
        self.sampling = Sampling.of(sampling)
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(policy.tokenizer or policy.name_or_path)
        self.model = build_model(policy, self.tokenizer).eval()
        self.rewards = WeightedRewards(list(rewards), reward_weights)
        # The reference: a separate model, the policy's LoRA base (adapter disabled), or a frozen copy.
        self.reference = build_reference(policy, reference, self.model) if needs_reference else None
        self.uses_adapter_reference = needs_reference and self.reference is None
        self.val_reward = MeanMetric()
        self._stats: dict[str, list[Tensor]] = {}
        self._rollout_tokens = 0

    # ---- rollout ------------------------------------------------------------------------------------------
    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, greedy: bool = False,
               sampling_round: int = 0) -> Rollout:
        """Complete left-padded prompts (B, P) with the policy; each rank, step and generation round of a step
        (dynamic sampling's refills) draws its own samples."""
        hp = self.hparams
        generator = (rollout_generator(hp.seed, self.global_rank, self.global_step, self.device)
                     if sampling_round == 0 else
                     seeded_generator(hp.seed, self.global_rank, self.global_step, sampling_round, device=self.device))
        return self.complete(prompt_ids, prompt_mask, **self.sampling.generate_kwargs(), do_sample=not greedy,
                             generator=generator)

    def next_prompts(self, sampling_round: int) -> dict:
        """A further prompt batch for refilling generation round ``sampling_round`` of this step (on the module's
        device): distinct rows of the training loader's dataset, drawn uniformly by a generator seeded with (seed,
        rank, step, round) and collated by the loader. A pure function of the step, so a run resumed from any
        checkpoint refills exactly as an uninterrupted one, and the Trainer's own batches are left alone. A loader
        with ``batch_size=None`` (its dataset items are batches) gives one item."""
        loader = self.trainer.train_dataloader
        # The trailing 1 keeps this stream apart from the round's token sampling, seeded by the first four parts.
        generator = seeded_generator(self.hparams.seed, self.global_rank, self.global_step, sampling_round, 1)
        if loader.batch_size is None:
            batch = loader.dataset[int(torch.randint(len(loader.dataset), (1,), generator=generator))]
        else:
            rows = torch.randperm(len(loader.dataset), generator=generator)[:loader.batch_size].tolist()
            batch = loader.collate_fn([loader.dataset[row] for row in rows])
        return next(self.batches_on_device([batch]))

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], columns: dict) -> Tensor:
        """(B,) fp32 weighted reward on the module's device; logs each reward's mean as ``rewards/<name>``."""
        total, parts = self.rewards(prompts, completions, **columns)
        for name, values in parts.items():
            self.record(f"rewards/{name}", values.mean())
        return total.to(self.device)

    @staticmethod
    def batch_columns(batch: dict, repeats: int = 1) -> tuple[list[str], dict]:
        """The prompts and the extra dataset columns of a prompt batch, each repeated ``repeats`` times in place."""
        columns = {key: [value for value in values for _ in range(repeats)]
                   for key, values in batch.items() if key not in PROMPT_KEYS}
        return columns.pop("prompt"), columns

    # ---- forward passes -----------------------------------------------------------------------------------
    num_minibatches = 1  # optimizer steps per pass over a rollout (PPO overrides)

    def minibatches(self, size: int) -> list[list[slice]]:
        """A rollout of ``size`` sequences cut into ``num_minibatches`` near-equal contiguous minibatches, each a
        list of micro-batches of at most ``micro_batch_size`` sequences. The cut depends only on ``size``, which
        is the same on every rank (the distributed sampler pads), so ranks run the same number of backward calls."""
        if size < self.num_minibatches:
            raise ValueError(f"a rollout of {size} sequences cannot make {self.num_minibatches} minibatches")
        bounds = [size * i // self.num_minibatches for i in range(self.num_minibatches + 1)]
        step = self.hparams.micro_batch_size or size
        return [[slice(start, min(start + step, stop)) for start in range(begin, stop, step)]
                for begin, stop in zip(bounds[:-1], bounds[1:])]

    def micro_batches(self, size: int) -> list[slice]:
        """Every micro-batch of a rollout, in order (the slices of ``minibatches``)."""
        return [rows for minibatch in self.minibatches(size) for rows in minibatch]

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> Tensor:
        """(B, N) log-probs of the completions under the reference, micro-batch by micro-batch."""
        pieces = []
        for rows in self.micro_batches(rollout.sequences.size(0)):
            args = (rollout.sequences[rows], rollout.attention_mask[rows], rollout.prompt_length,
                    self.sampling.temperature)
            if self.uses_adapter_reference:
                with self.model.disable_adapter():
                    pieces.append(completion_forward(self.model, *args).logprobs)
            else:
                pieces.append(completion_forward(self.reference, *args).logprobs)
        return torch.cat(pieces)

    # ---- optimisation -------------------------------------------------------------------------------------
    def updates_per_rollout(self) -> int:
        raise NotImplementedError

    def configure_optimizers(self):
        config = super().configure_optimizers()
        if isinstance(config, dict) and self.trainer.max_steps == -1:
            # Without max_steps Lightning counts batches (rollouts); the scheduler steps once per update.
            total = int(self.trainer.estimated_stepping_batches) * self.updates_per_rollout()
            config["lr_scheduler"]["scheduler"] = self.scheduler_factory(config["optimizer"], total)
        return config

    def global_sum(self, value: Tensor) -> Tensor:
        """``value`` summed over ranks (the denominators of step-level means)."""
        return self.trainer.strategy.reduce(value.detach().float().to(self.device), reduce_op="sum")

    def backward_share(self, numerator: Tensor, denominator: Tensor, across_ranks: bool = True) -> None:
        """Back-propagate one micro-batch's share ``numerator / denominator`` of the step's loss.

        ``denominator`` is the whole step's (all micro-batches; all ranks when ``across_ranks``), at least 1. DDP
        averages gradients over ranks, so a global mean is multiplied back by the world size.
        """
        scale = self.trainer.world_size if across_ranks else 1
        self.manual_backward(numerator * scale / denominator)

    def optimizer_step(self) -> None:
        """Clip, step, zero the gradients and advance the LR schedule (one update)."""
        optimizer = self.optimizers()
        if self.hparams.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    # ---- logging ------------------------------------------------------------------------------------------
    def record(self, name: str, value: Tensor) -> None:
        """Collect a statistic of this rollout; ``log_records`` logs the mean of each."""
        self._stats.setdefault(name, []).append(value.detach().float())

    def log_records(self) -> None:
        """Log the mean of each recorded statistic, on the steps the loggers write (``logs_this_step``)."""
        self.log_step_metrics({name: torch.stack(values).mean() for name, values in self._stats.items()})
        self._stats = {}

    def record_rollout(self, rollout: Rollout, rewards: Tensor) -> None:
        self.record("rollout/reward_mean", rewards.mean())
        self.record("rollout/reward_std", rewards.std() if rewards.numel() > 1 else torch.zeros(()))
        lengths = rollout.completion_lengths.float()
        self.record("rollout/completion_length", lengths.mean())
        self.record("rollout/completion_length_max", lengths.max())
        self.record("rollout/truncated_frac", rollout.truncated.float().mean())

        self._rollout_tokens = rollout.attention_mask.sum()  # stays on the device: no host sync

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Throughput counts every token of the rollout (prompts and completions) over rollout + updates."""
        if self.logs_this_step:
            elapsed = time.perf_counter() - self._batch_start
            self.log("perf/tokens_per_s", self._rollout_tokens / max(elapsed, 1e-9), on_step=True, on_epoch=False)

    # ---- evaluation: greedy completions scored by the same rewards ----------------------------------------
    def greedy_rewards(self, batch: dict) -> tuple[Tensor, Rollout]:
        """(B,) rewards of the greedy completions of a prompt batch."""
        rollout = self.sample(batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=True)
        prompts, columns = self.batch_columns(batch)
        total, _ = self.rewards(prompts, self.decode_completions(rollout), **columns)
        return total, rollout

    def validation_step(self, batch, batch_idx):
        rewards, _ = self.greedy_rewards(batch)
        self.val_reward.update(rewards)
        self.log("val/reward_mean", self.val_reward, prog_bar=True)

    @torch.no_grad()
    def evaluate(self, dataloader, max_batches: Optional[int] = None) -> dict[str, float]:
        """Mean reward and length of greedy completions over ``dataloader`` (outside the Trainer loop)."""
        rewards, lengths = [], []
        for batch in self.batches_on_device(dataloader, max_batches):
            batch_rewards, rollout = self.greedy_rewards(batch)
            rewards.append(batch_rewards)
            lengths.append(rollout.completion_lengths.float().cpu())
        return {"reward_mean": torch.cat(rewards).mean().item(), "completion_length": torch.cat(lengths).mean().item()}

    def predict_step(self, batch, batch_idx):
        rollout = self.sample(batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=True)
        return [{"prompt": p, "completion": c} for p, c in zip(batch["prompt"], self.decode_completions(rollout))]
