"""The trainer settings every measurement shares: a Lightning ``Trainer`` for lit_distill's side and the
``TrainingArguments`` keywords for TRL's, set to do the same thing per optimizer step.

Both sides: ``options.warmup + options.steps`` optimizer steps, batch ``options.batch_size`` on one device, no
gradient accumulation, fp32, gradient-norm clipping at 1.0, no evaluation, no checkpoints, no progress bar, no
gradient checkpointing, dataloader workers 0 and no pinned memory. The optimizer is ``torch.optim.AdamW`` with the
fused kernel (both frameworks' default) at ``options.lr`` with weight decay 0 and its default betas (0.9, 0.999) and
eps 1e-8, at a constant LR: each lit_distill module's ``optimizer`` argument (``adamw(options)``, no
``lr_scheduler``) and TRL's ``optim="adamw_torch_fused"`` with ``lr_scheduler_type="constant"``. Data order:
``training_order`` is the order lit_distill's DataModules draw their train split in (a seeded
``DistributedSampler``, epoch 0); hand TRL the rows in that order with
``train_sampling_strategy="sequential"`` (in ``trl_common_args``) and both sides see the same batches.

Logging, at one cadence: every ``LOGGING_STEPS`` optimizer steps. lit_distill's modules log their per-step metrics
only on the steps Lightning's loggers write (``log_every_n_steps``; ``CausalLMModule.log_step_metrics``), and with
``logger=False`` they are kept in ``trainer.callback_metrics`` and written nowhere; TRL's trainers call their ``log``
every ``logging_steps``, which with ``report_to="none"`` and ``trl_fit`` (the printer callback removed) goes nowhere
either. What each side computes for its metrics in between differs (see each measurement's notes).
"""

from __future__ import annotations

import functools
import tempfile

import torch

from lit_distill.bench import timing
from lit_distill.bench.workload import Options, Workload

LOGGING_STEPS = 10  # both sides' metric-logging cadence, in optimizer steps


def accelerator(options: Options) -> str:
    """Lightning's accelerator name for ``options.device`` (``cpu`` or ``cuda``)."""
    kind = torch.device(options.device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {options.device!r}")
    return kind


def adamw(options: Options):
    """The optimizer factory lit_distill's modules take: fused ``torch.optim.AdamW`` at ``options.lr``, weight decay 0
    (TRL's ``adamw_torch_fused`` with ``weight_decay=0``; both leave betas (0.9, 0.999) and eps 1e-8 at their
    defaults)."""
    return functools.partial(torch.optim.AdamW, lr=options.lr, weight_decay=0.0, fused=True)


def seed(options: Options) -> None:
    """Seed Python, NumPy and torch before a module is built (TRL does the same in its trainers' ``__init__``)."""
    import lightning as L

    L.seed_everything(options.seed, verbose=False)


def training_order(num_rows: int, options: Options) -> list[int]:
    """The indices of a train split of ``num_rows`` rows in the order lit_distill's ``EncodedDataModule`` serves them
    in its first epoch (a ``DistributedSampler`` on one rank, shuffled with ``options.seed``)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(num_rows), num_replicas=1, rank=0, shuffle=True, seed=options.seed)
    sampler.set_epoch(0)
    return list(sampler)


def validation_fraction(num_rows: int) -> float:
    """The smallest ``validation_fraction`` that leaves a single-file DataModule one validation row (it refuses an
    empty validation split); ``collate.holdout`` takes ``int(num_rows * fraction)`` rows from the front."""
    return 1.5 / num_rows


def lightning_trainer(options: Options, clock: timing.StepClock, **overrides):
    """A ``lightning.Trainer`` for ``options.warmup + options.steps`` optimizer steps, timed by ``clock``.

    ``overrides`` replace any keyword below (``callbacks`` are added after the clock's, not instead of it).
    """
    import lightning as L

    callbacks = [timing.lightning_clock(clock), *overrides.pop("callbacks", [])]
    kwargs = dict(accelerator=accelerator(options), devices=1, precision="32-true",
                  max_steps=options.warmup + options.steps, gradient_clip_val=1.0, gradient_clip_algorithm="norm",
                  accumulate_grad_batches=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                  log_every_n_steps=LOGGING_STEPS, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False)
    kwargs.update(overrides)
    return L.Trainer(callbacks=callbacks, **kwargs)


def lightning_fit(module, datamodule, options: Options, **overrides) -> float:
    """Fit ``module`` on ``datamodule`` with ``lightning_trainer`` and return the timed steps/s."""
    clock = timing.StepClock(options.warmup, options.device)
    lightning_trainer(options, clock, **overrides).fit(module, datamodule=datamodule)
    return clock.steps_per_s


def trl_common_args(options: Options) -> dict:
    """The ``TrainingArguments`` keywords every TRL config of a measurement shares (``output_dir`` is a fresh
    temporary directory; nothing is written to it, since saving and reporting are off)."""
    return dict(
        output_dir=tempfile.mkdtemp(prefix="lit_distill_bench_trl_"),
        max_steps=options.warmup + options.steps,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=options.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch_fused",  # HF's default with torch >= 2.8
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        bf16=False,  # TRL's configs default to bf16=True
        fp16=False,
        activation_checkpointing=False,  # TRL's configs default gradient_checkpointing (its old name) to True
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=LOGGING_STEPS,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,  # lit_distill's DataLoaders do not pin
        train_sampling_strategy="sequential",  # rows are handed over in ``training_order``
        use_cpu=accelerator(options) == "cpu",
        seed=options.seed,
        data_seed=options.seed,
        torch_compile=options.compile,
    )


def trl_fit(trainer, clock: timing.StepClock) -> float:
    """Train a TRL / HF ``Trainer`` built with ``callbacks=[timing.hf_clock(clock)]`` and return the timed steps/s.

    The ``PrinterCallback`` that ``disable_tqdm=True`` installs is removed first: it would print the logged metrics
    every ``LOGGING_STEPS`` steps, where lit_distill's side prints nothing.
    """
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock.steps_per_s


def trl_measurement(build_trl_trainer, **build_kwargs):
    """A ``Measurement.trl``: a fresh clock, ``build_trl_trainer(workload, options, clock=clock, **build_kwargs)``,
    trained by ``trl_fit``; returns the timed steps/s."""
    def measure(workload: Workload, options: Options) -> float:
        clock = timing.StepClock(options.warmup, options.device)
        return trl_fit(build_trl_trainer(workload, options, clock=clock, **build_kwargs), clock)

    return measure


def rows_dataset(rows: list[dict], order: list[int], columns: tuple[str, ...]):
    """A ``datasets.Dataset`` of ``rows[i]`` for ``i`` in ``order``, with only ``columns``."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_list([{column: rows[i][column] for column in columns} for i in order])
