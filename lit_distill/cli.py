"""``python -m lit_distill fit|validate|test|predict --config X.yaml`` (also the ``lit-distill`` console script).

LightningCLI in subclass mode: ``model`` and ``data`` take a ``class_path`` to any LightningModule or
LightningDataModule, the package's or a user's, and several ``--config`` files compose left to right.

The other commands (``cache-teacher``, ``write-data``, ``export``, ``generate``, ``plot``, ``bench``, ...) are in
:data:`COMMANDS`; ``python -m lit_distill --help`` lists them all.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
import warnings
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from jsonargparse import ArgumentParser, DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

import lit_distill.data  # noqa: F401  (registers the DataModules for short class names)
import lit_distill.modules  # noqa: F401  (registers the LightningModules)
from lit_distill.callbacks.cleanup import RemoveEmptyRunFolder
from lit_distill.checkpoints import RecordRunConfig, check_resume, check_save_dir
from lit_distill.checks import require
from lit_distill.errors import SIGTERM_EXIT_CODE, concise, debugging, exit_with, user_error_message


class ConciseParser(LightningArgumentParser):
    """A parse error is one message: no usage block, and of a union report only the alternative that failed."""

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error or debugging():
            super().error(message, ex)
        command = self.prog.replace(" [options]", "")
        exit_with(f"{concise(message)}\n(see {command} --help)")


class SaveConfigToRunFolder(SaveConfigCallback):
    """Lightning's config dump, into the logger's run folder only: without a logger, ``trainer.log_dir`` is the
    working directory, which is no run's folder, and nothing is written."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.loggers:
            super().setup(trainer, pl_module, stage)


PROG = "python -m lit_distill"  # also the ``lit-distill`` console script
# The commands beside LightningCLI's fit/validate/test/predict: name -> ("module:function" called with the
# remaining arguments, its line in --help). Imported only when run, so each pays only for what it needs.
COMMANDS = {
    "cache-teacher": ("lit_distill.cli:cache_teacher", "cache a DistillModule config's teacher top-k log-probs "
                                                       "(resumable)"),
    "write-data": ("lit_distill.teachers.writing:main", "have a teacher write completions of prompts (sequence-level "
                                                        "KD data)"),
    "generate-questions": ("lit_distill.commands.questions:main", "have a teacher write questions on topics (the "
                                                                   "agent loop's data)"),
    "generate": ("lit_distill.commands.generate:main", "completions from a saved model, .ckpt, .gguf or hub id"),
    "export": ("lit_distill.export.command:main", "LoRA adapter, merged weights, GGUF"),
    "plot": ("lit_distill.commands.plot:main", "a CSVLogger run's metrics as PNG plots"),
    "bench": ("lit_distill.bench.__main__:main", "benchmarks: training loops (vs TRL), sampling, MFU, KD memory"),
    "train-tokenizer": ("lit_distill.commands.tokenizer:main", "rebuild the shipped BPE tokenizer"),
}
COMMANDS_HELP = "other commands (each takes --help):\n" + "\n".join(
    f"  {name:<20}{summary}" for name, (_, summary) in COMMANDS.items()) + (
    "\n\nin a checkout of the repository, bin/ holds the experiments run on its configs (each takes --help):\n"
    "  bin/distill_comparison.py, bin/benchmark_logit_cache.py, bin/packing_speed.py")


class KeepEpilogLines(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help layout, with the epilog's command list kept one command per line."""


class LitDistillCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # Modules build their own optimizer over trainable parameters only (never a frozen teacher).
            auto_configure_optimizers=False,
            save_config_callback=SaveConfigToRunFolder,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=({"prog": PROG, "epilog": COMMANDS_HELP, "formatter_class": KeepEpilogLines} if run
                           else {"prog": f"{PROG} cache-teacher", "description": CacheTeacherCLI.__doc__}),
            parser_class=ConciseParser,
            trainer_defaults={"callbacks": [RemoveEmptyRunFolder()]},  # added to the config's callbacks
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--resume_config", type=Optional[Literal["checkpoint", "config"]], default=None,
                            help="with --ckpt_path, whose model/data arguments win where the config differs from the "
                                 "checkpoint's run (by default such a difference stops the run, listing them)")
        parser.add_argument("--overwrite_save_dir", type=bool, default=False,
                            help="let fit write its model into a model.init_args.save_dir that already holds files")

    def parse_arguments(self, parser, args) -> None:
        # Before LightningCLI replaces the config's model arguments with a checkpoint's hyperparameters: check the
        # checkpoint, list what differs, and keep the sections that win (see lit_distill.checkpoints).
        super().parse_arguments(parser, args)
        self._configured_model, self._winning_sections = None, {}
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            if not Path(ckpt_path).is_file():
                raise FileNotFoundError(f"--ckpt_path '{ckpt_path}' is not a file")
            data = config.data.as_dict() if config.get("data") is not None else None
            saved_model, saved_data = check_resume(ckpt_path, config.model.as_dict(), data, config.resume_config)
            self._configured_model = copy.deepcopy(config.model)
            if config.resume_config == "checkpoint":
                self._winning_sections = {"model": saved_model}
                if saved_data and data is not None:
                    self._winning_sections["data"] = saved_data

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config[self.subcommand] if self.subcommand else self.config
        data = config.get("data")
        trainer.callbacks.append(RecordRunConfig(config.model.as_dict(), data.as_dict() if data else None))
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else None
        if config is None:
            return
        if self._configured_model is not None:
            config.model = self._configured_model
        if self._winning_sections:
            self.config = self.parser.parse_object({self.subcommand: self._winning_sections}, self.config)
            config = self.config[self.subcommand]
        if self.subcommand == "fit":
            check_save_dir(config.model.get("init_args", {}).get("save_dir"), config.overwrite_save_dir)
        trainer = config.get("trainer") or {}
        require(trainer.get("accumulate_grad_batches", 1) >= 1, "trainer.accumulate_grad_batches",
                trainer.get("accumulate_grad_batches"), ">= 1")
        require((trainer.get("gradient_clip_val") or 0) >= 0, "trainer.gradient_clip_val",
                trainer.get("gradient_clip_val"), ">= 0 or null")
        if config.get("data") is not None and config.get("model") is not None:
            # The DataModule's argument and data checks, before the model's weights load (LightningCLI builds the
            # model first): a DataModule's constructor only checks and loads a tokenizer, and check_rows reads no
            # more than a few rows or cheap files, so building it twice is cheap.
            data_only = self.config.clone()
            data_only[self.subcommand].model = None
            datamodule = self.parser.instantiate_classes(data_only)[self.subcommand].data
            model_class = _import(config.model.class_path)
            if hasattr(datamodule, "check_rows"):
                datamodule.check_rows(getattr(model_class, "data_task", None))
            if hasattr(model_class, "check_data"):  # what the module's own arguments require of its data
                model_class.check_data(config.model.get("init_args") or {}, datamodule)


class CacheTeacherCLI(LitDistillCLI):
    """python -m lit_distill cache-teacher --config X.yaml [--output DIR]: run the teacher of a DistillModule config
    over its DataModule's splits and write the top-k log-probabilities (model.init_args.logit_cache, or --output).
    Resumable: finished shards are kept, a rerun writes only the missing ones. Only the DataModule is built here;
    the teacher loads only where a shard is missing, and the student never."""

    def __init__(self, args=None):
        super().__init__(args=args, run=False)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output", type=Optional[str], default=None,
                            help="cache directory (default: model.init_args.logit_cache.path)")
        parser.add_argument("--device", type=Optional[str], default=None, help="teacher device (default: cuda if "
                            "available, else cpu)")

    def instantiate_classes(self) -> None:
        from lit_distill.models.loading import load_tokenizer
        from lit_distill.modules.distill import DistillModule
        from lit_distill.teachers.logit_cache import (LogitCacheError, LogitCacheSpec, build_logit_cache,
                                                      cache_size, cache_teacher)

        model = self.config.model
        if not issubclass(_import(model.class_path), DistillModule):
            raise LogitCacheError(f"cache-teacher needs a DistillModule config; model.class_path is "
                                  f"{model.class_path}")
        init = distill_module_arguments(model.init_args.as_dict())
        spec = init.logit_cache or (LogitCacheSpec(path=self.config.output) if self.config.output else None)
        if spec is None:
            raise LogitCacheError("the config has no model.init_args.logit_cache: add one (path, top_k, ...) or "
                                  "pass --output DIR")
        if self.config.output:
            spec.path = self.config.output
        data_only = self.config.clone()
        data_only.model = None
        datamodule = self.parser.instantiate(data_only).data
        if getattr(datamodule, "task", "sft") is None:  # an HFDataModule serves what the DistillModule trains on
            datamodule.task = DistillModule.data_task
        device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        start = time.perf_counter()
        tokenizer = load_tokenizer(init.student.tokenizer or init.student.name_or_path)
        build_logit_cache(spec, cache_teacher(spec, init.teacher, tokenizer), tokenizer, datamodule, init.temperature,
                          device=device)
        size, positions = cache_size(spec.path)
        print(f"teacher cache {spec.path}: {positions:,} positions, {size / 2 ** 20:.1f} MiB "
              f"({size / max(positions, 1):.0f} bytes per position) in {time.perf_counter() - start:.1f} s")


def cache_teacher(argv: list[str]) -> None:
    with warnings.catch_warnings():  # Lightning warns that sys.argv also holds arguments: the command's name
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        CacheTeacherCLI(args=argv)


def distill_module_arguments(init_args: dict):
    """A DistillModule config's ``init_args`` parsed and typed as the CLI types them (ModelSpec, LogitCacheSpec,
    ... instantiated), without building the module: a Namespace of its arguments."""
    from lit_distill.modules.distill import DistillModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DistillModule, "model", instantiate=False, sub_configs=True)
    return parser.instantiate(parser.parse_object({"model": init_args})).model


def _import(class_path: str):
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def main(args=None) -> None:
    """A command of :data:`COMMANDS` runs its function; everything else goes to LightningCLI (``fit``,
    ``validate``, ...). A user error ends the run with one message and exit code 2 (see :mod:`lit_distill.errors`)."""
    try:
        _dispatch(sys.argv[1:] if args is None else args, args)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning leaves the DDP process group up; torn down at interpreter exit instead, gloo's threads
            # can abort the process ("terminate called without an active exception") after a finished run.
            torch.distributed.destroy_process_group()
    except SIGTERMException:
        # Lightning stops a SIGTERM'd fit cleanly (a ModelCheckpoint with save_on_exception writes a checkpoint
        # first) and would exit 0: a scheduler must see that the run did not finish.
        sys.stderr.write("stopped by SIGTERM; resume from the last checkpoint with --ckpt_path\n")
        sys.exit(SIGTERM_EXIT_CODE)
    except Exception as error:
        message = None if debugging() else user_error_message(error)
        if message is None:
            raise
        exit_with(message)


def _dispatch(argv, args) -> None:
    command = argv[0] if isinstance(argv, list) and argv else None
    if command in COMMANDS:
        module_name, _, function = COMMANDS[command][0].partition(":")
        getattr(importlib.import_module(module_name), function)(argv[1:])
    else:
        LitDistillCLI(args=args)
