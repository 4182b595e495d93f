"""``python -m lit_distill fit|validate|test|predict --config X.yaml`` (also the ``lit-distill`` console script).

LightningCLI in subclass mode: ``model`` and ``data`` take a ``class_path`` to any LightningModule or
LightningDataModule, the package's or a user's, and several ``--config`` files compose left to right.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

import lit_distill.data  # noqa: F401  (registers the DataModules for short class names)
import lit_distill.modules  # noqa: F401  (registers the LightningModules)


class LitDistillCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # Modules build their own optimizer over trainable parameters only (never a frozen teacher).
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def main(args=None) -> None:
    LitDistillCLI(args=args)
