"""A failed run leaves no empty run folder behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L

# What a run writes before its first result: the config dump and the hyperparameters.
PREAMBLE_FILES = frozenset({"config.yaml", "hparams.yaml"})


class RemoveEmptyRunFolder(L.Callback):
    """When fit (or validate, test) fails, remove each logger's run folder if it holds nothing but the config dump
    and hyperparameters: a run that wrote metrics, samples or checkpoints keeps its folder. The CLI adds it to
    every trainer."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()  # metrics logged but not flushed yet count as results
            folder = getattr(logger, "log_dir", None)
            if folder and Path(folder).is_dir() and all(
                    path.is_file() and path.name in PREAMBLE_FILES for path in Path(folder).rglob("*")):
                shutil.rmtree(folder)
