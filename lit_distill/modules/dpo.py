"""Direct preference optimisation (Rafailov et al. 2023), its variants (IPO, hinge, robust) and the reference-free
SimPO and ORPO, which score the same (2B, T) forward's per-token mean log-probs and build no reference model, and
KTO (Ethayarajh et al. 2024) on unpaired completions labelled desirable or undesirable.

KTO's reference point z is an estimate of KL(π‖π_ref) from mismatched (prompt, completion) pairs of the batch: the
data module's ``kl_*`` rows (each prompt with another row's completion, see ``data.preference.collate_unpaired``),
scored by the policy without gradient and by the reference. As in TRL, z is the mean over the batches of all ranks.

For DPO the reference is, in order of preference for memory: reference log-probs precomputed once before training
(``precompute_reference``; the reference model is then freed), the policy's LoRA base with the adapter disabled,
a separate frozen model (``reference``), or a frozen copy of the initial policy. Dropout is off in both models
(a stochastic policy log-prob biases the log-ratio), so the policy is kept in eval mode while it trains.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch.cli import OptimizerCallable
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from lit_distill.checks import require
from lit_distill.data.preference import serves_unpaired
from lit_distill.losses import DPO_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, dpo_loss, kto_loss, orpo_loss, simpo_loss
from lit_distill.models.loading import ModelSpec, build_model, build_reference, load_tokenizer
from lit_distill.models.forward import labelled_sequence_logprobs
from lit_distill.modules.base import CausalLMModule, default_optimizer
from lit_distill.optim import SchedulerCallable

LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES + ("kto",)
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
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0, precompute_reference: bool = False,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[SchedulerCallable] = None,
                 save_dir: Optional[str] = None, merge_lora: bool = False):
        """
        Args:
            policy: the trained model (e.g. the SFT output); with ``lora`` set, the reference is its base model.
            reference: a separate frozen reference; None uses the LoRA base or a frozen copy of the policy. Must
                be None for ``simpo`` and ``orpo``, which have no reference.
            beta: DPO temperature β of the implicit reward β·log(π/π_ref); SimPO's reward scale β; ORPO's λ.
            loss_type: one of ``LOSS_TYPES``: ``DPO_LOSS_TYPES`` (see ``dpo_loss``), ``simpo`` (``simpo_loss``),
                ``orpo`` (``orpo_loss``) or ``kto`` (``kto_loss``, on a data module with ``unpaired: true``); ``ipo``,
                ``simpo`` and ``orpo`` use per-token mean log-probs.
            label_smoothing: ε of conservative / robust DPO and of SimPO.
            gamma: SimPO's target reward margin γ (γ itself, not γ/β); only ``simpo`` uses it.
            desirable_weight: KTO's λ_D; only ``kto`` uses it.
            undesirable_weight: KTO's λ_U; only ``kto`` uses it.
            precompute_reference: compute every pair's reference log-probs once at fit start, then drop the
                reference model. Not for ``kto``: its mismatched KL rows change with each batch.
        """
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, save_dir=save_dir, merge_lora=merge_lora)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type '{loss_type}' is not one of {LOSS_TYPES}")
        require(beta > 0, "beta", beta, "> 0")
        require(0 <= label_smoothing < 0.5, "label_smoothing", label_smoothing, "in [0, 0.5)")
        require(gamma >= 0, "gamma", gamma, ">= 0")
        require(desirable_weight > 0, "desirable_weight", desirable_weight, "> 0")
        require(undesirable_weight > 0, "undesirable_weight", undesirable_weight, "> 0")
        if gamma != 0 and loss_type != "simpo":
            raise ValueError(f"gamma is SimPO's margin, got gamma={gamma} with loss_type='{loss_type}'")
        if (desirable_weight, undesirable_weight) != (1.0, 1.0) and loss_type != "kto":
            raise ValueError(f"desirable_weight and undesirable_weight are KTO's, got loss_type='{loss_type}'")
        if loss_type == "kto" and precompute_reference:
            raise ValueError("precompute_reference does not apply to loss_type 'kto': its KL rows pair each prompt "
                             "with another row's completion of the same batch, which changes with the shuffle")
        self.reference_free = loss_type in REFERENCE_FREE_LOSS_TYPES
        if self.reference_free and (reference is not None or precompute_reference):
            raise ValueError(f"loss_type '{loss_type}' uses no reference model: leave reference unset and "
                             "precompute_reference false")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.tokenizer = load_tokenizer(policy.tokenizer or policy.name_or_path)
        self.model = build_model(policy, self.tokenizer).eval()
        self.reference = None if self.reference_free else build_reference(policy, reference, self.model)
        self.uses_adapter_reference = self.reference is None and not self.reference_free
        self.sides = ("completion", "kl") if loss_type == "kto" else ("chosen", "rejected")  # batch key prefixes
        self.precomputed: dict[bytes, tuple[float, float]] = {}
        self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric()
        self.val_desirable, self.val_undesirable = MeanMetric(), MeanMetric()  # KTO's mean rewards by label

    @staticmethod
    def check_data(init_args: dict, datamodule) -> None:
        """KTO trains on unpaired rows, every other loss on pairs: a data module whose ``unpaired`` says otherwise is
        an error before any model loads (the CLI calls this; ``preference_loss`` checks each batch as well)."""
        unpaired = serves_unpaired(datamodule)
        kto = init_args.get("loss_type") == "kto"
        if unpaired is None or kto == unpaired:
            return
        if kto:
            raise ValueError("model.init_args.loss_type 'kto' trains on unpaired rows: set data.init_args.unpaired: "
                             "true")
        raise ValueError(f"data.init_args.unpaired is true (rows labelled desirable or undesirable), which only "
                         f"loss_type 'kto' trains on; model.init_args.loss_type is '{init_args.get('loss_type')}'")

    # ---- log-probs ----------------------------------------------------------------------------------------
    def sequence_logps(self, model, batch: dict, sides: Optional[tuple[str, ...]] = None) -> tuple[torch.Tensor, ...]:
        """(B,) log-probs of each side (default ``self.sides``: chosen and rejected, or KTO's completion and kl) from
        one (len(sides)·B, T) forward, the head on completion tokens only; per-token means for ``LENGTH_NORMALISED``
        losses."""
        sides = sides or self.sides
        input_ids = torch.cat([batch[f"{side}_input_ids"] for side in sides])  # (len(sides)·B, T)
        attention_mask = torch.cat([batch[f"{side}_attention_mask"] for side in sides])
        labels = torch.cat([batch[f"{side}_labels"] for side in sides])
        logps, counts = labelled_sequence_logprobs(model, input_ids, attention_mask, labels)
        if self.hparams.loss_type in LENGTH_NORMALISED:
            logps = logps / counts.clamp(min=1)
        return logps.chunk(len(sides))

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
        """The loss, its stats and the policy's detached (B,) log-probs of both sides (KTO: completion and kl)."""
        hp = self.hparams
        if ("label" in batch) != (hp.loss_type == "kto"):
            raise ValueError(f"loss_type '{hp.loss_type}' got " + ("unpaired rows: use loss_type 'kto'" if "label" in
                             batch else "preference pairs: set the data module's unpaired: true for KTO"))
        if hp.loss_type == "kto":
            (policy,) = self.sequence_logps(self.model, batch, ("completion",))
            with torch.no_grad():  # the reference point z is detached
                (policy_kl,) = self.sequence_logps(self.model, batch, ("kl",))
            reference, reference_kl = self.reference_logps(batch)
            loss, stats = kto_loss(policy, reference, policy_kl, reference_kl, batch["label"], beta=hp.beta,
                                   desirable_weight=hp.desirable_weight, undesirable_weight=hp.undesirable_weight,
                                   reduction=reduction, kl_mean=self.kl_mean_over_ranks(policy_kl - reference_kl))
            return loss, stats, policy.detach(), policy_kl
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

    def kl_mean_over_ranks(self, shifts: torch.Tensor) -> Optional[torch.Tensor]:
        """KTO's unclamped z under DDP: the mean of the mismatched log-ratios of every rank's rows (TRL averages the
        ranks' means: the same for equal batches); None on one process (``kto_loss`` takes the batch mean)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        totals = torch.stack([shifts.detach().float().sum(), torch.tensor(float(shifts.numel()), device=shifts.device)])
        dist.all_reduce(totals)
        return totals[0] / totals[1]

    def training_step(self, batch, batch_idx):
        loss_sum, stats, chosen, rejected = self.preference_loss(batch, reduction="sum")
        rows = torch.tensor(len(chosen), device=self.device)  # pairs, or KTO's completions
        metrics = {"train/loss": loss_sum.detach() / rows}
        if self.hparams.loss_type == "kto":
            desirable, undesirable = stats.rewards[stats.desirable], stats.rewards[~stats.desirable]
            metrics.update({"kto/kl": stats.kl, "kto/logps": chosen.mean(), "kto/logps_kl": rejected.mean()})
            metrics.update({f"kto/rewards_{name}": rewards.mean() for name, rewards in
                            (("desirable", desirable), ("undesirable", undesirable)) if len(rewards)})
        else:
            metrics.update({"dpo/rewards_chosen": stats.rewards_chosen.mean(),
                            "dpo/rewards_rejected": stats.rewards_rejected.mean(), "dpo/accuracy": stats.accuracy,
                            "dpo/margin": stats.margin.mean(), "dpo/logps_chosen": chosen.mean(),
                            "dpo/logps_rejected": rejected.mean(),
                            **({"orpo/nll": stats.nll} if self.hparams.loss_type == "orpo" else {})})
        self.log_step_metrics(metrics)
        return self.step_normalised(loss_sum, rows)

    def validation_step(self, batch, batch_idx):
        loss, stats, chosen, _ = self.preference_loss(batch, reduction="mean")
        rows = len(chosen)
        self.log("val/loss", loss, batch_size=rows, sync_dist=True)
        if self.hparams.loss_type == "kto":
            for metric, rewards in ((self.val_desirable, stats.rewards[stats.desirable]),
                                    (self.val_undesirable, stats.rewards[~stats.desirable])):
                if len(rewards):
                    metric.update(rewards)
            self.log("val/kl", stats.kl, batch_size=rows, sync_dist=True)
            return
        self.val_accuracy.update(stats.accuracy, weight=rows)
        self.val_margin.update(stats.margin.mean(), weight=rows)
        self.log_dict({"val/accuracy": self.val_accuracy, "val/margin": self.val_margin}, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.hparams.loss_type == "kto":  # margin: desirable minus undesirable mean reward over the split
            desirable, undesirable = self.val_desirable.compute(), self.val_undesirable.compute()
            self.log_dict({"val/rewards_desirable": desirable, "val/rewards_undesirable": undesirable,
                           "val/margin": desirable - undesirable}, prog_bar=True)
            self.val_desirable.reset()
            self.val_undesirable.reset()

