"""The autocurriculum: difficulty measured with a rolling frozen copy of the model moves the mixture weights of a
:class:`~lit_distill.data.curriculum.CurriculumDataModule`."""

from __future__ import annotations

import copy
from typing import Optional

import lightning as L
import torch
from torch import Tensor, nn

from lit_distill.data.curriculum import CurriculumDataModule
from lit_distill.losses.logprobs import sequence_logprobs_from_logits
from lit_distill.models.forward import causal_lm_logits


def example_losses(model: nn.Module, batch: dict) -> Tensor:
    """Per-example mean token negative log-likelihood (B,) of a batch of any of the package's DataModules.

    Supervised batches (``labels``) score their labelled tokens (e.g. a SQuAD answer, every token of a text
    block); prompt-only batches (RL prompts, questions) score the prompt's own tokens after its first.
    """
    if "labels" in batch:
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    elif "prompt_input_ids" in batch:
        input_ids, attention_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # (B, P)
        # A left-padded row's first real token would be scored from a pad: it has no context, so it is not scored.
        labels[torch.arange(len(labels)), attention_mask.argmax(-1)] = -100
    else:
        raise ValueError(f"the curriculum scores batches with labels (text, SFT) or prompts (RL, questions); this "
                         f"dataset's batches have neither (keys {sorted(batch)}), e.g. preference pairs")
    logits = causal_lm_logits(model, input_ids, attention_mask)  # (B, T, V)
    logps, num_tokens = sequence_logprobs_from_logits(logits, labels)  # (B,), (B,)
    return -logps / num_tokens.clamp(min=1)


class Autocurriculum(L.Callback):
    """Every ``estimate_every`` optimizer steps, a frozen snapshot of the trained model measures the mean and
    variance of its per-example loss on each dataset's fixed difficulty sample (split across ranks, summed over
    them), and the :class:`~lit_distill.data.curriculum.CurriculumDataModule` moves its weights with
    :func:`~lit_distill.data.curriculum.curriculum_update`; every ``refresh_every`` steps the snapshot is
    reloaded from the live model. Measuring with a snapshot rather than the live model keeps difficulties of
    successive measurements comparable within a refresh period and costs no gradient memory. Between two refreshes
    the snapshot scores the same fixed sample, so it is measured once per refresh; the estimates in between
    reuse that measurement and move the weights by the update rule's momentum.

    DDP: the sums are all-reduced and every rank applies the same float64 update, then rank 0's weights are
    broadcast, so all ranks draw from identical weights. Checkpoints keep the snapshot's trainable parameters (for a
    LoRA model only the adapter) and the step counters, so a resumed run measures exactly as an uninterrupted one.

    Logs ``curriculum/<name>/{weight,difficulty,variance,samples}`` at each measurement.
    """

    def __init__(self, estimate_every: int = 50, refresh_every: int = 200):
        """
        Args:
            estimate_every: optimizer steps between difficulty measurements (and weight updates); the first one
                runs at the start of training.
            refresh_every: optimizer steps between snapshot refreshes from the live model.
        """
        if estimate_every < 1 or refresh_every < 1:
            raise ValueError(f"estimate_every and refresh_every must be >= 1, got {estimate_every} and "
                             f"{refresh_every}")
        self.estimate_every, self.refresh_every = estimate_every, refresh_every
        self.snapshot: Optional[nn.Module] = None
        self.next_estimate = 0
        self.next_refresh = refresh_every
        self._trainable: set[str] = set()
        self._restored_snapshot: Optional[dict] = None
        self._measured: Optional[Tensor] = None  # (D, [n, Σx, Σx²]) of the current snapshot, summed over ranks

    @staticmethod
    def _datamodule(trainer: L.Trainer) -> CurriculumDataModule:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, CurriculumDataModule):
            raise TypeError(f"Autocurriculum needs a CurriculumDataModule as data, got {type(datamodule).__name__}")
        return datamodule

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._datamodule(trainer)
        self._trainable = {name for name, p in pl_module.model.named_parameters() if p.requires_grad}
        self.snapshot = copy.deepcopy(pl_module.model).eval().requires_grad_(False)
        self._measured = None
        if self._restored_snapshot is not None:
            self.snapshot.load_state_dict(self._restored_snapshot, strict=False)
            self._restored_snapshot = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # Before the step's forward: the first measurement happens before any update.
        step = trainer.global_step
        if step >= self.next_refresh:
            self.snapshot.load_state_dict(pl_module.model.state_dict())
            self._measured = None
            self.next_refresh = (step // self.refresh_every + 1) * self.refresh_every
        if step >= self.next_estimate:
            self.measure(trainer, pl_module)
            self.next_estimate = (step // self.estimate_every + 1) * self.estimate_every

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure every dataset's difficulty with the snapshot, update the weights and log them."""
        datamodule = self._datamodule(trainer)
        if self._measured is None:
            self._measured = self._measure_snapshot(trainer, pl_module, datamodule)
        n, total, squares = self._measured.unbind(-1)
        mean = total / n.clamp(min=1)
        variance = (squares - n * mean.square()) / (n - 1).clamp(min=1)  # unbiased
        datamodule.update_weights(mean.cpu(), variance.clamp(min=0).cpu())
        state = trainer.strategy.broadcast(torch.stack([datamodule.weights, datamodule.velocity]), src=0)
        datamodule.set_weights(state[0], state[1])
        metrics = {}
        for index, name in enumerate(datamodule.names):
            metrics.update({f"curriculum/{name}/weight": datamodule.weights[index].item(),
                            f"curriculum/{name}/difficulty": mean[index].item(),
                            f"curriculum/{name}/variance": variance[index].item(),
                            f"curriculum/{name}/samples": datamodule.samples_drawn[index].item()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def _measure_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule,
                          datamodule: CurriculumDataModule) -> Tensor:
        """(D, [n, Σx, Σx²]) of the snapshot's per-example losses on each dataset's difficulty sample, over ranks."""
        sums = torch.zeros(len(datamodule.names), 3, dtype=torch.float64, device=pl_module.device)
        for index in range(len(datamodule.names)):
            for batch in datamodule.difficulty_batches(index, trainer.global_rank, trainer.world_size):
                batch = {k: v.to(pl_module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                try:
                    losses = example_losses(self.snapshot, batch).double()  # (B,)
                except ValueError as err:
                    raise ValueError(f"datasets.{datamodule.names[index]}: {err}") from err
                sums[index] += torch.stack([torch.tensor(float(len(losses)), device=losses.device), losses.sum(),
                                            losses.square().sum()])
        return trainer.strategy.reduce(sums, reduce_op="sum")

    # ---- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"next_estimate": self.next_estimate, "next_refresh": self.next_refresh}
        if self.snapshot is not None:
            # Frozen parameters (a LoRA base) equal the live model's: only the trainable ones are saved.
            state["snapshot"] = {name: tensor.clone() for name, tensor in self.snapshot.state_dict().items()
                                 if name in self._trainable}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.next_estimate, self.next_refresh = state["next_estimate"], state["next_refresh"]
        self._restored_snapshot = state.get("snapshot")
