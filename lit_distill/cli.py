"""``python -m lit_distill fit|validate|test|predict --config X.yaml`` (also the ``lit-distill`` console script).

LightningCLI in subclass mode: ``model`` and ``data`` take a ``class_path`` to any LightningModule or
LightningDataModule, the package's or a user's, and several ``--config`` files compose left to right.
"""

from __future__ import annotations

import importlib
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI, _InstantiatorFn

import lit_distill.data  # noqa: F401  (registers the DataModules for short class names)
import lit_distill.modules  # noqa: F401  (registers the LightningModules)


class _TopLevelInstantiator(_InstantiatorFn):
    """Lightning's instantiator hands the ``model``/``data`` config to the module as its hyperparameters, but it
    is registered for every LightningDataModule subclass, so DataModules nested in the config (the datasets of a
    CurriculumDataModule) would receive their parent's config. Only the configured top-level class gets it here;
    nested ones save their own arguments."""

    def __call__(self, class_type, *args, applied_instantiation_links: dict, **kwargs):
        self.cli._dump_config()
        class_path = self.cli.config_dump.get(self.key, {}).get("class_path", "")
        module_name, _, name = class_path.rpartition(".")
        if module_name and getattr(importlib.import_module(module_name), name, None) is not class_type:
            return class_type(*args, **kwargs)
        return super().__call__(class_type, *args, applied_instantiation_links=applied_instantiation_links,
                                **kwargs)


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

    def _add_instantiators(self) -> None:
        self.parser.add_instantiator(_TopLevelInstantiator(cli=self, key="model"), L.LightningModule, subclasses=True)
        self.parser.add_instantiator(_TopLevelInstantiator(cli=self, key="data"), L.LightningDataModule,
                                     subclasses=True)


def main(args=None) -> None:
    """``export ...`` goes to the export command; everything else to LightningCLI (``fit``, ``validate``, ...)."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["export"]:
        from lit_distill.export.command import main as export_main

        export_main(argv[1:])
    else:
        LitDistillCLI(args=args)
