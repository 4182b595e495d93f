"""Supervised fine-tuning / pre-training: next-token cross-entropy on one model."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics.text import SQuAD, Perplexity

from lit_distill.checks import require
from lit_distill.models.loading import ModelSpec, build_model, load_tokenizer
from lit_distill.models.forward import LabelledLogits, labelled_logits
from lit_distill.modules.base import CausalLMModule, default_optimizer
from lit_distill.optim import SchedulerCallable


def token_cross_entropy(scored: LabelledLogits) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled positions and their count, fp32 scalars."""
    loss_sum = F.cross_entropy(scored.logits.float(), scored.targets, reduction="sum")
    return loss_sum, scored.mask.sum()


class SFTModule(CausalLMModule):
    """Cross-entropy training of one causal LM (pre-training on packed text or SFT on masked labels)."""

    data_task = "sft"  # what an HFDataModule serves this module

    def __init__(self, model: ModelSpec, *, eval_max_new_tokens: int = 16,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[SchedulerCallable] = None,
                 save_dir: Optional[str] = None, merge_lora: bool = False):
        """
        Args:
            model: the trained model.
            eval_max_new_tokens: answer budget when evaluation batches carry prompts and gold answers (SQuAD):
                greedy answers are then scored with exact match and F1.
        """
        require(eval_max_new_tokens >= 1, "eval_max_new_tokens", eval_max_new_tokens, ">= 1")
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, save_dir=save_dir, merge_lora=merge_lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.tokenizer = load_tokenizer(model.tokenizer or model.name_or_path)
        self.model = build_model(model, self.tokenizer).train()  # from_pretrained returns eval mode
        self.ppl = Perplexity(ignore_index=-100)
        self.squad = SQuAD()

    def scored(self, batch: dict) -> LabelledLogits:
        """Logits at the labelled positions only (prompt and padding tokens never reach the LM head)."""
        return labelled_logits(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               position_ids=batch.get("position_ids"))

    def training_step(self, batch, batch_idx):
        loss_sum, num_tokens = token_cross_entropy(self.scored(batch))
        self.log_step_metrics({"train/loss": loss_sum.detach() / num_tokens.clamp(min=1)}, prog_bar=True)
        return self.step_normalised(loss_sum, num_tokens)

    def validation_step(self, batch, batch_idx):
        self.evaluation_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluation_step(batch, "test")

    def evaluation_step(self, batch, stage: str) -> None:
        scored = self.scored(batch)
        loss_sum, num_tokens = token_cross_entropy(scored)
        self.ppl(scored.logits[None].float(), scored.targets[None])  # (1, N, V): the metric wants a batch dim
        self.log(f"{stage}/loss", loss_sum / num_tokens.clamp(min=1), batch_size=int(num_tokens), sync_dist=True)
        self.log(f"{stage}/ppl", self.ppl, prog_bar=True)
        if "answers" in batch:
            predictions = self.greedy_completions(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                                  self.hparams.eval_max_new_tokens)
            self.squad.update(
                [{"prediction_text": text, "id": id_} for text, id_ in zip(predictions, batch["ids"])],
                [{"answers": {"text": list(answers), "answer_start": [0] * len(answers)}, "id": id_}
                 for answers, id_ in zip(batch["answers"], batch["ids"])])

    def on_validation_epoch_end(self) -> None:
        self.log_answer_quality("val")

    def on_test_epoch_end(self) -> None:
        self.log_answer_quality("test")

    def log_answer_quality(self, stage: str) -> None:
        """SQuAD exact match and F1 (percentages) over the epoch's generated answers, when there were any."""
        if self.squad.update_count:
            scores = self.squad.compute()
            self.log_dict({f"{stage}/exact_match": scores["exact_match"], f"{stage}/f1": scores["f1"]}, prog_bar=True)
        self.squad.reset()
