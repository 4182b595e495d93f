"""Resuming from a checkpoint with a config: the checkpoint is checked before anything is built, and every model or
data argument the config sets differently from the checkpoint's run is listed; the run stops unless
``--resume_config checkpoint`` or ``--resume_config config`` says which wins. A module class other than the
checkpoint's is always an error.

The CLI records the run's ``model`` and ``data`` config sections in every checkpoint (:class:`RecordRunConfig`), so
that what the module's hyperparameters leave out (the optimizer, the learning-rate schedule) is compared and
restored too; a checkpoint without that record is compared on its hyperparameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

# The checkpoint entry holding the run's {"model": ..., "data": ...} config sections.
RUN_CONFIG_KEY = "lit_distill_run_config"


class RecordRunConfig(L.Callback):
    """Writes the run's ``model`` and ``data`` config sections (``{"class_path", "init_args"}`` dicts, plain JSON
    values) into every checkpoint under :data:`RUN_CONFIG_KEY`."""

    def __init__(self, model: dict, data: Optional[dict]):
        self.sections = {"model": plain(model), "data": plain(data)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.sections


def plain(section: Any) -> Any:
    """A config section as JSON values (paths and other objects as their strings), as checkpoints record it."""
    return json.loads(json.dumps(section, default=str))


def read_checkpoint(path: str) -> dict:
    """A Lightning checkpoint, loaded on the CPU with ``weights_only``.

    Raises:
        ValueError: the file is not a Lightning checkpoint (naming it).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a text file, a truncated download, a safetensors file, ...
        raise ValueError(f"--ckpt_path '{path}' is not a Lightning checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt_path '{path}' is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def recorded_sections(checkpoint: dict) -> tuple[dict, Optional[dict]]:
    """The checkpoint's ``model`` and ``data`` config sections: the CLI's record, else rebuilt from the saved
    hyperparameters (which lack the optimizer and schedule)."""
    if RUN_CONFIG_KEY in checkpoint:
        return checkpoint[RUN_CONFIG_KEY]["model"], checkpoint[RUN_CONFIG_KEY]["data"]

    def section(hparams: dict) -> Optional[dict]:
        if not hparams:
            return None
        return {"class_path": hparams.get("_class_path"),
                "init_args": {key: value for key, value in hparams.items() if not key.startswith("_")}}

    return (section(checkpoint.get("hyper_parameters") or {}) or {},
            section(checkpoint.get("datamodule_hyper_parameters") or {}))


def differences(saved: Any, configured: Any, prefix: str, saved_keys_only: bool) -> list[str]:
    """``"<key>: checkpoint <a>, config <b>"`` for every argument set otherwise in the two, and ``"<key>: only in the
    checkpoint"`` (or config) for a whole entry one of them lacks; of the checkpoint's arguments only when
    ``saved_keys_only`` (hyperparameters do not record every argument)."""
    if not (isinstance(saved, dict) and isinstance(configured, dict)):
        normalised = [list(value) if isinstance(value, tuple) else value for value in (saved, configured)]
        return [] if normalised[0] == normalised[1] else [f"{prefix}: checkpoint {saved!r}, config {configured!r}"]
    listed = []
    for key in [*saved, *(key for key in configured if key not in saved and not saved_keys_only)]:
        if str(key).startswith("_"):
            continue
        if key not in configured or key not in saved:
            listed.append(f"{prefix}.{key}: only in the {'checkpoint' if key in saved else 'config'}")
        else:
            listed += differences(saved[key], configured[key], f"{prefix}.{key}", saved_keys_only)
    return listed


def check_resume(ckpt_path: str, model: dict, data: Optional[dict],
                 resume_config: Optional[str]) -> tuple[dict, Optional[dict]]:
    """Check resuming ``ckpt_path`` with a config whose model and data sections are ``model`` and ``data``
    (``{"class_path", "init_args"}`` dicts): the checkpoint's model and data sections (see
    :func:`recorded_sections`).

    Raises:
        ValueError: not a checkpoint; another module class; or differing arguments with ``resume_config`` None.
    """
    checkpoint = read_checkpoint(ckpt_path)
    saved_model, saved_data = recorded_sections(checkpoint)
    model, data = plain(model), plain(data)
    partial = RUN_CONFIG_KEY not in checkpoint
    saved_class = saved_model.get("class_path")
    if saved_class and model.get("class_path") and saved_class != model["class_path"]:
        raise ValueError(f"--ckpt_path '{ckpt_path}' was written by {saved_class}, and this config trains "
                         f"{model['class_path']}: resume with the config of that run")
    listed = differences(saved_model.get("init_args") or {}, model.get("init_args") or {}, "model.init_args", partial)
    if data is not None and saved_data:
        if saved_data.get("class_path") not in (None, data.get("class_path")):
            listed.append(f"data.class_path: checkpoint {saved_data['class_path']!r}, "
                          f"config {data.get('class_path')!r}")
        else:
            listed += differences(saved_data.get("init_args") or {}, data.get("init_args") or {}, "data.init_args",
                                  partial)
    if listed and resume_config is None:
        raise ValueError(f"the config differs from the run that wrote '{ckpt_path}':\n  " + "\n  ".join(listed)
                         + "\nresume with --resume_config checkpoint (its values) or --resume_config config (these)")
    return saved_model, saved_data


def check_save_dir(save_dir: Optional[str], overwrite: bool) -> None:
    """Refuse a ``save_dir`` that already holds files, unless ``overwrite``: it is another run's model."""
    if save_dir and not overwrite and Path(save_dir).is_dir() and any(Path(save_dir).iterdir()):
        raise ValueError(f"model.init_args.save_dir '{save_dir}' already holds files (another run's model): choose "
                         f"another save_dir, or pass --overwrite_save_dir true to replace them")
