"""One way to time a training loop, for lit_distill's Lightning Trainer and for Hugging Face / TRL trainers alike.

A run trains ``warmup + steps`` optimizer steps; its speed is ``steps`` divided by the wall time from the end of
optimizer step ``warmup`` to the end of the last one, so set-up, compilation and the first (slow) steps are not
counted, and the same steps are counted on both sides. ``interleave`` runs the candidates A B A B … in one process
window, so that a change in the machine's load hits every candidate alike, and reports medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class StepClock:
    """Timestamps of optimizer steps: ``tick(step)`` after each one; ``steps_per_s`` over the steps after ``warmup``."""

    warmup: int
    device: str = "cpu"
    start: float = 0.0
    end: float = 0.0
    last_step: int = 0

    def __post_init__(self):
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the clock starts at the end of step `warmup`), got {self.warmup}")

    def tick(self, step: int) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if step >= self.warmup > self.last_step:  # the first tick at or past the warm-up
            self.start = now
        self.end, self.last_step = now, step

    @property
    def steps_per_s(self) -> float:
        if self.last_step <= self.warmup:
            raise RuntimeError(f"the run ended at step {self.last_step}, before the {self.warmup} warm-up steps were "
                               "over: nothing was timed")
        return (self.last_step - self.warmup) / (self.end - self.start)


def lightning_clock(clock: StepClock):
    """A Lightning callback that ticks ``clock`` after every optimizer step (``trainer.global_step``)."""
    import lightning as L

    class LightningStepClock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick(trainer.global_step)

    return LightningStepClock()


def hf_clock(clock: StepClock):
    """A ``transformers.TrainerCallback`` that ticks ``clock`` after every optimizer step (``state.global_step``)."""
    from transformers import TrainerCallback

    class HFStepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(state.global_step)

    return HFStepClock()


def quiet() -> None:
    """Silence the banners, progress bars and by-design warnings both frameworks print, which cost time too."""
    import logging
    import warnings

    from transformers.utils import logging as transformers_logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # frozen models, by design
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # inside Lightning


@dataclass
class Comparison:
    """Steps/s of each candidate in every round, in the order they ran."""

    rounds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.rounds[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of ``name``'s speed divided by ``baseline``'s in the same round."""
        return statistics.median(a / b for a, b in zip(self.rounds[name], self.rounds[baseline]))


def interleave(candidates: Mapping[str, Callable[[], float]], rounds: int) -> Comparison:
    """Run every candidate (a function that trains once and returns steps/s) once per round, in turn."""
    comparison = Comparison({name: [] for name in candidates})
    for _ in range(rounds):
        for name, candidate in candidates.items():
            comparison.rounds[name].append(candidate())
    return comparison
