"""Learning-rate schedules that know the run's length (the module passes ``trainer.estimated_stepping_batches``)."""

from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

# YAML: `lr_scheduler: {class_path: lit_distill.optim.WarmupCosine, init_args: {warmup_steps: 10}}`; the module
# supplies the optimizer and the total number of optimizer steps.
SchedulerCallable = Callable[[Optimizer, int], LRScheduler]


class WarmupCosine(LambdaLR):
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` × lr at ``total_steps``."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        if total_steps <= 0 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"WarmupCosine needs total_steps > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1; "
                             f"got {total_steps}, {warmup_steps}, {min_lr_ratio}")

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
