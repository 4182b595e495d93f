"""Before/after summary of a distillation run, printed at the end and written to ``distill_report.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class DistillReport(L.Callback):
    """Evaluates teacher and student on the validation data when fit starts and when it ends.

    The numbers come from ``DistillModule.evaluate`` on rank 0's shard of the validation data.
    """

    def __init__(self, max_batches: Optional[int] = None):
        self.max_batches = max_batches
        self.before: dict[str, float] = {}

    def _evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        return pl_module.evaluate(trainer.datamodule.val_dataloader(), max_batches=self.max_batches)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        self.before = self._evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        self.write(trainer, self._evaluate(trainer, pl_module))

    @rank_zero_only
    def write(self, trainer: L.Trainer, after: dict[str, float]) -> None:
        report = {"teacher_ppl": after["teacher_ppl"],
                  "student_ppl_before": self.before["student_ppl"], "student_ppl_after": after["student_ppl"],
                  "kd_divergence_before": self.before["kd_divergence"], "kd_divergence_after": after["kd_divergence"],
                  "steps": trainer.global_step}
        print("\n".join([
            "distillation report (validation data)",
            f"  teacher perplexity         {report['teacher_ppl']:10.3f}",
            f"  student perplexity  before {report['student_ppl_before']:10.3f}   after {report['student_ppl_after']:10.3f}",
            f"  KD divergence       before {report['kd_divergence_before']:10.4f}   after {report['kd_divergence_after']:10.4f}",
        ]))
        if trainer.log_dir:
            path = Path(trainer.log_dir) / "distill_report.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
