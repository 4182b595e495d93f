"""Reward modelling: a causal-LM backbone with a scalar head, trained with the Bradley–Terry loss on
(prompt, chosen, rejected) pairs; the score is read at the last real token of each sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric

from lit_distill.checks import require
from lit_distill.data.preference import serves_unpaired
from lit_distill.losses import reward_loss
from lit_distill.models.heads import ScalarHead, final_hidden_states
from lit_distill.models.loading import ModelSpec, build_model, load_tokenizer, save_pretrained
from lit_distill.models.reward_model import SCORE_HEAD_FILE, load_reward_model
from lit_distill.modules.base import CausalLMModule, default_optimizer
from lit_distill.optim import SchedulerCallable


class RewardModule(CausalLMModule):
    data_task = "preference"  # what an HFDataModule serves this module

    @staticmethod
    def check_data(init_args: dict, datamodule) -> None:
        """Before any model loads (the CLI calls this): a reward model learns from pairs, not KTO's unpaired rows."""
        if serves_unpaired(datamodule):
            raise ValueError("RewardModule learns from preference pairs; the data serves unpaired rows (prompt, "
                             "completion, label), which only DPOModule(loss_type: kto) trains on")

    def __init__(self, model: ModelSpec, *, center_coefficient: float = 0.0,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[SchedulerCallable] = None,
                 save_dir: Optional[str] = None, merge_lora: bool = False):
        """
        Args:
            model: the backbone (any causal LM; its output head is unused, the hidden states feed the score head).
            center_coefficient: weight of Eisenstein et al.'s (r_c + r_r)² term that keeps rewards centred at 0.
            save_dir: where the backbone (HF format) and ``score_head.pt`` are written at the end of training.
        """
        require(center_coefficient >= 0, "center_coefficient", center_coefficient, ">= 0")
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, save_dir=save_dir, merge_lora=merge_lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.tokenizer = load_tokenizer(model.tokenizer or model.name_or_path)
        self.model = build_model(model, self.tokenizer).train()  # from_pretrained returns eval mode
        self.score_head = ScalarHead(self.model.config.hidden_size)
        self.val_accuracy, self.val_loss = MeanMetric(), MeanMetric()

    def trainable_parameters(self):
        return super().trainable_parameters() + list(self.score_head.parameters())

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and mask -> (B,) fp32 rewards."""
        return self.score_head.score(final_hidden_states(self.model, input_ids, attention_mask), attention_mask)

    def pair_loss(self, batch: dict, reduction: str):
        """Chosen and rejected in one (2B, T) forward pass; returns ``reward_loss``'s (loss, stats)."""
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        chosen, rejected = self.scores(input_ids, attention_mask).chunk(2)  # (B,), (B,)
        return reward_loss(chosen, rejected, batch["margin"], center_coefficient=self.hparams.center_coefficient,
                           reduction=reduction)

    def training_step(self, batch, batch_idx):
        loss_sum, stats = self.pair_loss(batch, reduction="sum")
        num_pairs = torch.tensor(batch["margin"].shape[0], device=self.device)
        self.log_step_metrics({"train/loss": loss_sum.detach() / num_pairs, "reward/accuracy": stats.accuracy,
                               "reward/margin": stats.margin, "reward/chosen": stats.chosen_mean,
                               "reward/rejected": stats.rejected_mean})
        return self.step_normalised(loss_sum, num_pairs)  # pairs, not tokens, are this loss's unit

    def validation_step(self, batch, batch_idx):
        loss, stats = self.pair_loss(batch, reduction="mean")
        pairs = batch["margin"].shape[0]
        self.val_loss.update(loss, weight=pairs)
        self.val_accuracy.update(stats.accuracy, weight=pairs)
        self.log_dict({"val/loss": self.val_loss, "val/accuracy": self.val_accuracy}, prog_bar=True)

    @rank_zero_only
    def save_pretrained(self, path: str) -> None:
        """The backbone in HF format plus the score head, loadable with :func:`load_reward_model`."""
        save_pretrained(self.model, self.tokenizer, path, merge_lora=self.merge_lora)
        torch.save(self.score_head.state_dict(), Path(path) / SCORE_HEAD_FILE)


__all__ = ["RewardModule", "load_reward_model"]
