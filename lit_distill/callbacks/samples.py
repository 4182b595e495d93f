"""Completions of fixed evaluation prompts during training, as a table per logging point: a wandb table, TensorBoard
text, and JSONL / CSV files under the log directory, so the model's answers can be read before, during and after."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lit_distill.data.chat import format_prompt
from lit_distill.data.collate import tokenize
from lit_distill.data.io import read_prompts_file
from lit_distill.rollout import left_pad, rollout_generator

COLUMNS = ["step", "prompt", "completion"]


def markdown_table(rows: list[dict]) -> str:
    """``rows`` (``prompt`` / ``completion`` dicts) as a Markdown table; pipes and newlines are escaped so that
    every row stays one table row."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>") or " "

    lines = ["| prompt | completion |", "|---|---|"]
    lines += [f"| {cell(row['prompt'])} | {cell(row['completion'])} |" for row in rows]
    return "\n".join(lines)


class PromptSamples(L.Callback):
    """Completes a fixed list of prompts with the trained model when training starts, every ``every_n_steps``
    optimizer steps, and when it ends, and logs the rows ``{step, prompt, completion}``:

    * to every :class:`~lightning.pytorch.loggers.WandbLogger`: a ``wandb.Table`` under ``key`` holding all rows so
      far (the latest table shows the whole before/after history);
    * to every :class:`~lightning.pytorch.loggers.TensorBoardLogger`: a Markdown table of the step's rows as text
      under ``key``;
    * always: appended to ``{key}.jsonl`` and ``{key}.csv`` under ``trainer.log_dir`` (the default root dir without
      a logger). Other loggers are left alone.

    Generation goes through the module's own :meth:`~lit_distill.modules.base.CausalLMModule.complete` (eval mode,
    left padding, the run's end tokens), all prompts in one batch, so any CausalLMModule works. Every rank generates
    (with the same seed, so sharded models see the same forward passes on all ranks) and only global rank zero logs.

    Args:
        prompts: the user texts to complete.
        prompts_file: more prompts: a ``.txt`` file (one per non-blank line) or a ``.jsonl`` file with a ``prompt``
            field per line; appended after ``prompts``.
        every_n_steps: optimizer steps between logging points; 0 logs only at the start and at the end.
        max_new_tokens: completion budget.
        temperature: 0 for greedy decoding; above 0, sampling at that temperature from a generator seeded by
            ``(seed, step)``, so a rerun draws the same completions.
        chat_template: how prompts are formatted, as in :func:`~lit_distill.data.chat.format_prompt` (``"none"``,
            ``"default"`` or a Jinja file); None follows the DataModule (its ``chat_template`` and system prompt
            hyper-parameters, ``"none"`` when it has none), so the prompts look like the training prompts.
        system_prompt: system message for a chat template (None: the DataModule's when following it).
        seed: base seed of sampling.
        key: name of the wandb table, of the TensorBoard text and of the files.
    """

    def __init__(self, prompts: Optional[list[str]] = None, prompts_file: Optional[str] = None,
                 every_n_steps: int = 100, max_new_tokens: int = 48, temperature: float = 0.0,
                 chat_template: Optional[str] = None, system_prompt: Optional[str] = None, seed: int = 0,
                 key: str = "samples"):
        self.prompts = list(prompts or []) + (read_prompts_file(prompts_file) if prompts_file else [])
        if not self.prompts:
            raise ValueError("PromptSamples needs prompts: give prompts and/or a prompts_file")
        if every_n_steps < 0 or max_new_tokens < 1 or temperature < 0:
            raise ValueError(f"every_n_steps must be >= 0, max_new_tokens >= 1 and temperature >= 0; got "
                             f"{every_n_steps}, {max_new_tokens} and {temperature}")
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.seed = seed
        self.key = key
        self.rows: list[dict] = []  # every row logged so far, for the cumulative wandb table
        self._formatted: list[str] = []
        self._last_step: Optional[int] = None

    # ---- generation ---------------------------------------------------------------------------------------------
    def formatted_prompts(self, tokenizer, datamodule: Optional[L.LightningDataModule] = None) -> list[str]:
        """The prompts as the model sees them: formatted by ``chat_template``, or like ``datamodule``'s prompts."""
        chat_template, system = self.chat_template, self.system_prompt
        if chat_template is None:
            hparams = getattr(datamodule, "hparams", {})
            chat_template = hparams.get("chat_template") or "none"
            system = system or hparams.get("system_prompt") or hparams.get("system")
        return [format_prompt(tokenizer, prompt, chat_template, system) for prompt in self.prompts]

    def completions(self, pl_module, formatted: list[str], step: int) -> list[str]:
        """Completions of the ``formatted`` prompts by ``pl_module``'s trained model, decoded up to their end."""
        token_ids = [tokenize(pl_module.tokenizer, text) for text in formatted]
        empty = [prompt for prompt, ids in zip(self.prompts, token_ids) if not ids]
        if empty:
            raise ValueError(f"PromptSamples: prompt(s) {empty} are empty once formatted and tokenized")
        input_ids, attention_mask = left_pad(token_ids, pl_module.tokenizer.pad_token_id)  # (B, P)
        sampling = dict(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0)
        if self.temperature > 0:
            # Rank 0's stream on every rank: all ranks draw the same completions.
            sampling.update(temperature=self.temperature,
                            generator=rollout_generator(self.seed, 0, step, pl_module.device))
        rollout = pl_module.complete(input_ids.to(pl_module.device), attention_mask.to(pl_module.device), **sampling)
        return pl_module.decode_completions(rollout)

    # ---- hooks --------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # Not on_fit_start: a resumed run's global_step is only restored after it.
        self._formatted = self.formatted_prompts(pl_module.tokenizer, getattr(trainer, "datamodule", None))
        self.sample(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # "Crossed a multiple" rather than "is a multiple": a manual-optimisation step may take several optimizer
        # steps, and gradient accumulation calls this hook several times per step.
        if self.every_n_steps and trainer.global_step // self.every_n_steps > self._last_step // self.every_n_steps:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    def sample(self, trainer: L.Trainer, pl_module) -> None:
        """Complete the prompts at the current step and log the rows (on every rank: see the class docstring)."""
        step = trainer.global_step
        self._last_step = step
        completions = self.completions(pl_module, self._formatted, step)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast: every rank must ask
        if trainer.is_global_zero:
            self.log_rows(trainer, [{"step": step, "prompt": prompt, "completion": completion}
                                    for prompt, completion in zip(self.prompts, completions)], Path(log_dir))

    # ---- logging ------------------------------------------------------------------------------------------------
    def log_rows(self, trainer: L.Trainer, rows: list[dict], log_dir: Path) -> None:
        """Write ``rows`` (one step's) to the files under ``log_dir`` and to the wandb / TensorBoard loggers."""
        self.rows += rows
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / f"{self.key}.jsonl").open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        csv_path = log_dir / f"{self.key}.csv"
        write_header = not csv_path.exists()
        with csv_path.open("a", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            if write_header:
                writer.writeheader()
            writer.writerows(rows)
        step = rows[0]["step"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(self.key, columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in self.rows],
                                 step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(self.key, markdown_table(rows), global_step=step)
