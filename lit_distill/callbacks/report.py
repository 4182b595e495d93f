"""Before/after summaries of a run: the module's own evaluation on the validation data when fit starts and when it
ends, printed and written as JSON under the log directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class EvaluationReport(L.Callback):
    """Calls ``pl_module.evaluate(val_dataloader, max_batches)`` (a dict of floats) at fit start and fit end, and
    writes ``{name}_before`` / ``{name}_after`` for every metric, plus ``steps``, to ``filename``.

    The numbers come from rank 0's shard of the validation data.

    Args:
        max_batches: validation batches evaluated each time (None: all).
        filename: JSON file written under the trainer's log directory.
        title: first line of the printed table.
    """

    def __init__(self, max_batches: Optional[int] = None, filename: str = "report.json", title: str = "report"):
        self.max_batches = max_batches
        self.filename = filename
        self.title = title
        self.before: dict[str, float] = {}

    def _evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        return pl_module.evaluate(trainer.datamodule.val_dataloader(), max_batches=self.max_batches)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        self.before = self._evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not only the one that writes
        self.write(trainer, self._evaluate(trainer, pl_module), log_dir)

    @rank_zero_only
    def write(self, trainer: L.Trainer, after: dict[str, float], log_dir: Optional[str]) -> None:
        report = {f"{name}_{when}": values[name] for name in after
                  for when, values in (("before", self.before), ("after", after))}
        report["steps"] = trainer.global_step
        width = max(len(name) for name in after)
        print("\n".join([f"{self.title} (validation data)"] + [
            f"  {name:<{width}}  before {self.before[name]:12.4f}   after {after[name]:12.4f}" for name in after]))
        if log_dir:
            path = Path(log_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))


class DistillReport(EvaluationReport):
    """Teacher perplexity, student perplexity and KD divergence before/after (``DistillModule.evaluate``), written to
    ``distill_report.json``."""

    def __init__(self, max_batches: Optional[int] = None):
        super().__init__(max_batches, filename="distill_report.json", title="distillation report")
