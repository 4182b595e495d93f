"""What every causal-LM LightningModule here shares: the optimizer over trainable parameters only, exact
token-level normalisation over a whole optimizer step, throughput logging, frozen models kept out of
checkpoints, and saving the trained model in Hugging Face format."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lit_distill.models.loading import eos_token_ids, save_pretrained
from lit_distill.optim import SchedulerCallable
from lit_distill.rollout import Rollout, generate


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW at lr 1e-4 with the fused kernel (CPU and CUDA): one kernel for every parameter instead of a loop of
    small ones, 2-3x faster a step on a small model; TRL / HF Trainer's default (``adamw_torch_fused``) too."""
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


class CausalLMModule(L.LightningModule):
    """Base class. Subclasses build ``self.model`` (the trained model) and ``self.tokenizer``, list frozen
    submodules in ``frozen_modules``, and return ``self.step_normalised(loss_sum, num_tokens)`` from
    ``training_step``.

    Step normalisation: a token-level loss must be divided by the number of loss tokens of the whole optimizer
    step (every micro-batch of gradient accumulation, every rank), so that accumulation 8×1 equals 1×8 exactly
    even when micro-batches hold different numbers of tokens. That count is only known once the step's last
    micro-batch has been seen, so each micro-batch back-propagates its token *sum* (rescaled to undo Lightning's
    1/accumulate and DDP's 1/world_size averaging), and the summed gradients are divided by the all-reduced token
    count in ``on_before_optimizer_step``, before gradient clipping and the optimizer step.
    """

    frozen_modules: tuple[str, ...] = ()
    # Submodules that stay in eval mode (no dropout) when Lightning switches the module to train mode each epoch.
    eval_modules: tuple[str, ...] = ()

    def __init__(self, *, optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: Optional[SchedulerCallable] = None, save_dir: Optional[str] = None,
                 merge_lora: bool = False):
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.save_dir = save_dir
        self.merge_lora = merge_lora
        self.strict_loading = False  # checkpoints leave out the frozen modules
        self._step_tokens = torch.zeros((), dtype=torch.float64)
        self._batch_start = 0.0

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.eval_modules:
            if getattr(self, name, None) is not None:
                getattr(self, name).eval()
        return self

    # ---- optimisation -------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the trained model's parameters that require grad (modules with extra heads
        add theirs)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        trainable = self.trainable_parameters()
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        optimizer = self.optimizer_factory(trainable)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def step_normalised(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """The value to back-propagate for a micro-batch whose token-summed loss is ``loss_sum``."""
        self._step_tokens = self._step_tokens.to(num_tokens.device) + num_tokens.detach()  # stays on device: no sync
        return loss_sum * (self.trainer.accumulate_grad_batches * self.trainer.world_size)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.automatic_optimization:  # manual optimisation (RL) normalises each update itself
            return
        count = self.trainer.strategy.reduce(self._step_tokens.to(self.device), reduce_op="sum").clamp(min=1.0)
        self._step_tokens = torch.zeros_like(self._step_tokens)
        grads = [param.grad for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
        for dtype in {grad.dtype for grad in grads}:  # one foreach kernel per dtype, not one small kernel per tensor
            torch._foreach_div_([grad for grad in grads if grad.dtype == dtype], count.to(dtype))

    # ---- frozen models stay out of checkpoints ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prefixes = tuple(f"{name}." for name in self.frozen_modules)
        if prefixes:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]

    # ---- throughput ---------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.logs_this_step:
            elapsed = time.perf_counter() - self._batch_start
            tokens = sum(value.sum() for key, value in batch.items() if key.endswith("attention_mask"))
            self.log("perf/tokens_per_s", tokens / max(elapsed, 1e-9), on_step=True, on_epoch=False)

    # ---- logging ------------------------------------------------------------------------------------------
    @property
    def logs_this_step(self) -> bool:
        """Whether the loggers write this training step's on-step metrics (every ``trainer.log_every_n_steps``).

        On-step values logged on any other step are never written, but each ``self.log`` still costs Lightning
        about a millisecond of Python bookkeeping (and ``.item()`` a host sync), several percent of a small model's
        step; ``log_step_metrics`` skips them. ``trainer.callback_metrics`` then holds the last written step's
        values. Lightning's own test (``_logger_connector.should_update_logs``) decides, so the two never disagree.
        """
        trainer = self.trainer
        return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs

    def log_step_metrics(self, metrics: dict, prog_bar: bool = False) -> None:
        """Log per-step training metrics, on the steps the loggers write only (see ``logs_this_step``)."""
        if self.logs_this_step:
            self.log_dict(metrics, prog_bar=prog_bar, on_step=True, on_epoch=False)

    # ---- generation -----------------------------------------------------------------------------------------
    predict_max_new_tokens = 32

    @torch.no_grad()
    def complete(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **sampling) -> Rollout:
        """Continue left-padded prompts (B, P) with the trained model, in eval mode (no dropout while sampling).

        ``generate`` with the run's tokenizer and end ids (the tokenizer's EOS and the model's generation-config
        EOS, e.g. <|im_end|>); ``sampling`` holds its other arguments (``max_new_tokens``, ``temperature``, ...;
        ``Sampling.generate_kwargs()`` gives a module's group of them).
        """
        was_training = self.model.training
        self.model.eval()
        with torch.compiler.set_stance("force_eager"):  # a compiled decoder (ModelSpec.compile) runs eagerly here
            rollout = generate(self.model, input_ids, attention_mask,
                               eos_token_id=eos_token_ids(self.model, self.tokenizer),
                               pad_token_id=self.tokenizer.pad_token_id, tokenizer=self.tokenizer, **sampling)
        self.model.train(was_training)
        return rollout

    def decode_completions(self, rollout: Rollout) -> list[str]:
        """The completions of ``rollout`` as text, up to and without their end token."""
        return [self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                for ids, mask in zip(rollout.completions, rollout.completion_mask)]

    def greedy_completions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           max_new_tokens: int) -> list[str]:
        """Greedy continuations of left-padded prompts (B, P), decoded up to EOS."""
        return self.decode_completions(self.complete(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                                     do_sample=False))

    def batches_on_device(self, dataloader, max_batches: Optional[int] = None) -> Iterator[dict]:
        """The first ``max_batches`` batches of ``dataloader`` (all when None), tensors on the module's device; for
        evaluation outside the Trainer loop."""
        for batch in itertools.islice(dataloader, max_batches):
            yield {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                   for key, value in batch.items()}

    def predict_step(self, batch, batch_idx):
        """Greedy continuation of every example of the batch (its prompt when it has one, else its input ids)."""
        input_ids = batch.get("prompt_input_ids", batch["input_ids"])
        attention_mask = batch.get("prompt_attention_mask", batch["attention_mask"])
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        completions = self.greedy_completions(input_ids, attention_mask, self.predict_max_new_tokens)
        return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]

    # ---- export -------------------------------------------------------------------------------------------
    def on_train_end(self) -> None:
        if self.save_dir:
            self.save_pretrained(self.save_dir)

    @rank_zero_only
    def save_pretrained(self, path: str) -> None:
        """Save the trained model and its tokenizer so that plain transformers loads them back."""
        save_pretrained(self.model, self.tokenizer, path, merge_lora=self.merge_lora)
