"""Direct preference optimisation (Rafailov et al. 2023), its variants (IPO, hinge, robust) and the reference-free
SimPO and ORPO, which score the same (2B, T) forward's per-token mean log-probs and build no reference model.

For DPO the reference is, in order of preference for memory: reference log-probs precomputed once before training
(``precompute_reference``; the reference model is then freed), the policy's LoRA base with the adapter disabled,
a separate frozen model (``reference``), or a frozen copy of the initial policy. Dropout is off in both models
(a stochastic policy log-prob biases the log-ratio), so the policy is kept in eval mode while it trains.
"""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from lit_distill.checks import require
from lit_distill.losses import DPO_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, dpo_loss, orpo_loss, simpo_loss
from lit_distill.models.loading import ModelSpec, build_model, build_reference, load_tokenizer
from lit_distill.models.forward import labelled_sequence_logprobs
from lit_distill.modules.base import CausalLMModule, default_optimizer
from lit_distill.optim import SchedulerCallable

LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES
LENGTH_NORMALISED = ("ipo",) + REFERENCE_FREE_LOSS_TYPES  # losses on per-token mean log-probs


def pair_key(batch: dict, row: int) -> bytes:
    """Identity of one pair: its unpadded chosen and rejected token ids (stable across epochs and ranks)."""
    parts = []
    for side in ("chosen", "rejected"):
        ids = batch[f"{side}_input_ids"][row][batch[f"{side}_attention_mask"][row].bool()]
        parts.append(ids.cpu().numpy().tobytes())
    return b"|".join(parts)


class DPOModule(CausalLMModule):
    data_task = "preference"  # what an HFDataModule serves this module
    frozen_modules = ("reference",)
    eval_modules = ("model", "reference")  # no dropout: the policy's log-probs are compared with the reference's

    def __init__(self, policy: ModelSpec, *, reference: Optional[ModelSpec] = None, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 0.0,
                 precompute_reference: bool = False,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[SchedulerCallable] = None,
                 save_dir: Optional[str] = None, merge_lora: bool = False):
        """
        Args:
            policy: the trained model (e.g. the SFT output); with ``lora`` set, the reference is its base model.
            reference: a separate frozen reference; None uses the LoRA base or a frozen copy of the policy. Must
                be None for ``simpo`` and ``orpo``, which have no reference.
            beta: DPO temperature β of the implicit reward β·log(π/π_ref); SimPO's reward scale β; ORPO's λ.
            loss_type: one of ``LOSS_TYPES``: ``DPO_LOSS_TYPES`` (see ``dpo_loss``), ``simpo`` (``simpo_loss``) or
                ``orpo`` (``orpo_loss``); ``ipo``, ``simpo`` and ``orpo`` use per-token mean log-probs.
            label_smoothing: ε of conservative / robust DPO and of SimPO.
            gamma: SimPO's target reward margin γ (γ itself, not γ/β); only ``simpo`` uses it.
            precompute_reference: compute every pair's reference log-probs once at fit start, then drop the
                reference model.
        """
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, save_dir=save_dir, merge_lora=merge_lora)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type '{loss_type}' is not one of {LOSS_TYPES}")
        require(beta > 0, "beta", beta, "> 0")
        require(0 <= label_smoothing < 0.5, "label_smoothing", label_smoothing, "in [0, 0.5)")
        require(gamma >= 0, "gamma", gamma, ">= 0")
        if gamma != 0 and loss_type != "simpo":
            raise ValueError(f"gamma is SimPO's margin, got gamma={gamma} with loss_type='{loss_type}'")
        self.reference_free = loss_type in REFERENCE_FREE_LOSS_TYPES
        if self.reference_free and (reference is not None or precompute_reference):
            raise ValueError(f"loss_type '{loss_type}' uses no reference model: leave reference unset and "
                             "precompute_reference false")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.tokenizer = load_tokenizer(policy.tokenizer or policy.name_or_path)
        self.model = build_model(policy, self.tokenizer).eval()
        self.reference = None if self.reference_free else build_reference(policy, reference, self.model)
        self.uses_adapter_reference = self.reference is None and not self.reference_free
        self.precomputed: dict[bytes, tuple[float, float]] = {}
        self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric()

    # ---- log-probs ----------------------------------------------------------------------------------------
    def sequence_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected (B,) log-probs from one (2B, T) forward, the head on completion tokens only; per-token
        means for ``LENGTH_NORMALISED`` losses."""
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        logps, counts = labelled_sequence_logprobs(model, input_ids, attention_mask, labels)
        if self.hparams.loss_type in LENGTH_NORMALISED:
            logps = logps / counts.clamp(min=1)
        chosen, rejected = logps.chunk(2)
        return chosen, rejected

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precomputed:
            values = torch.tensor([self.precomputed[pair_key(batch, row)] for row in range(len(batch["margin"]))],
                                  device=self.device)  # (B, 2)
            return values[:, 0], values[:, 1]
        return self.live_reference_logps(batch)

    @torch.no_grad()
    def live_reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uses_adapter_reference:
            with self.model.disable_adapter():
                return self.sequence_logps(self.model, batch)
        return self.sequence_logps(self.reference, batch)

    def on_fit_start(self) -> None:
        if self.hparams.precompute_reference and not self.precomputed:
            self.precompute_reference_logps()

    @torch.no_grad()
    def precompute_reference_logps(self) -> None:
        """Every train and validation pair, on every rank (the sampler reshuffles pairs across ranks each epoch),
        then the reference model is released."""
        datamodule = self.trainer.datamodule
        for split in ("train", "validation"):
            loader = DataLoader(datamodule.datasets[split], batch_size=datamodule.hparams.batch_size,
                                collate_fn=datamodule.collate_fn(split))
            for batch in self.batches_on_device(loader):
                chosen, rejected = self.live_reference_logps(batch)
                for row in range(len(chosen)):
                    self.precomputed[pair_key(batch, row)] = (chosen[row].item(), rejected[row].item())
        self.reference = None

    # ---- steps --------------------------------------------------------------------------------------------
    def preference_loss(self, batch: dict, reduction: str):
        hp = self.hparams
        policy_chosen, policy_rejected = self.sequence_logps(self.model, batch)
        if hp.loss_type == "simpo":
            loss, stats = simpo_loss(policy_chosen, policy_rejected, beta=hp.beta, gamma=hp.gamma,
                                     label_smoothing=hp.label_smoothing, reduction=reduction)
        elif hp.loss_type == "orpo":
            loss, stats = orpo_loss(policy_chosen, policy_rejected, beta=hp.beta, reduction=reduction)
        else:
            reference_chosen, reference_rejected = self.reference_logps(batch)
            loss, stats = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                   beta=hp.beta, loss_type=hp.loss_type, label_smoothing=hp.label_smoothing,
                                   reduction=reduction)
        return loss, stats, policy_chosen.detach(), policy_rejected.detach()

    def training_step(self, batch, batch_idx):
        loss_sum, stats, chosen, rejected = self.preference_loss(batch, reduction="sum")
        num_pairs = torch.tensor(len(chosen), device=self.device)
        self.log_step_metrics({"train/loss": loss_sum.detach() / num_pairs,
                               "dpo/rewards_chosen": stats.rewards_chosen.mean(),
                               "dpo/rewards_rejected": stats.rewards_rejected.mean(), "dpo/accuracy": stats.accuracy,
                               "dpo/margin": stats.margin.mean(), "dpo/logps_chosen": chosen.mean(),
                               "dpo/logps_rejected": rejected.mean(),
                               **({"orpo/nll": stats.nll} if self.hparams.loss_type == "orpo" else {})})
        return self.step_normalised(loss_sum, num_pairs)

    def validation_step(self, batch, batch_idx):
        loss, stats, _, _ = self.preference_loss(batch, reduction="mean")
        pairs = len(batch["margin"])
        self.val_accuracy.update(stats.accuracy, weight=pairs)
        self.val_margin.update(stats.margin.mean(), weight=pairs)
        self.log("val/loss", loss, batch_size=pairs, sync_dist=True)
        self.log_dict({"val/accuracy": self.val_accuracy, "val/margin": self.val_margin}, prog_bar=True)

