"""Resuming from a checkpoint with a config: the checkpoint is checked before anything is built, and every model or
data argument the config sets differently from the checkpoint's run is listed; the run stops unless
``--resume_config checkpoint`` or ``--resume_config config`` says which wins. A module class other than the
checkpoint's is always an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

def read_checkpoint_hparams(path: str) -> tuple[dict, dict]:
    """The model's and the DataModule's saved hyperparameters of a Lightning checkpoint.

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
    return checkpoint.get("hyper_parameters") or {}, checkpoint.get("datamodule_hyper_parameters") or {}


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            if not str(key).startswith("_"):
                flat.update(_flat(item, f"{prefix}.{key}"))
        return flat
    return {prefix: list(value) if isinstance(value, tuple) else value}


def differences(saved: dict, configured: dict, prefix: str) -> list[str]:
    """``"<key>: checkpoint <a>, config <b>"`` for every argument the checkpoint records that the config sets
    otherwise (arguments the checkpoint does not record, such as the optimizer, are not compared)."""
    saved_flat, configured_flat = _flat(saved, prefix), _flat(configured, prefix)
    return [f"{key}: checkpoint {value!r}, config {configured_flat.get(key)!r}"
            for key, value in saved_flat.items() if configured_flat.get(key) != value]


def check_resume(ckpt_path: str, model: dict, data: Optional[dict], resume_config: Optional[str]) -> tuple[dict, dict]:
    """Check resuming ``ckpt_path`` with a config whose model and data sections are ``model`` and ``data``
    (``{"class_path", "init_args"}`` dicts): the checkpoint's (model, data) hyperparameters.

    Raises:
        ValueError: not a checkpoint; another module class; or differing arguments with ``resume_config`` None.
    """
    saved_model, saved_data = read_checkpoint_hparams(ckpt_path)
    saved_class = saved_model.get("_class_path")
    if saved_class and model.get("class_path") and saved_class != model["class_path"]:
        raise ValueError(f"--ckpt_path '{ckpt_path}' was written by {saved_class}, and this config trains "
                         f"{model['class_path']}: resume with the config of that run")
    listed = differences(saved_model, model.get("init_args") or {}, "model.init_args")
    if data is not None and saved_data:
        if saved_data.get("_class_path") not in (None, data.get("class_path")):
            listed.append(f"data.class_path: checkpoint {saved_data['_class_path']!r}, "
                          f"config {data.get('class_path')!r}")
        else:
            listed += differences(saved_data, data.get("init_args") or {}, "data.init_args")
    if listed and resume_config is None:
        raise ValueError(f"the config differs from the run that wrote '{ckpt_path}':\n  " + "\n  ".join(listed)
                         + "\nresume with --resume_config checkpoint (its values) or --resume_config config (these)")
    return saved_model, saved_data


def check_save_dir(save_dir: Optional[str], overwrite: bool) -> None:
    """Refuse a ``save_dir`` that already holds files, unless ``overwrite``: it is another run's model."""
    if save_dir and not overwrite and Path(save_dir).is_dir() and any(Path(save_dir).iterdir()):
        raise ValueError(f"model.init_args.save_dir '{save_dir}' already holds files (another run's model): choose "
                         f"another save_dir, or pass --overwrite_save_dir true to replace them")
