"""Hugging Face exports: the LoRA adapter (peft format) and merged weights (16-bit, or bitsandbytes 4-bit on CUDA)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_distill.export.errors import ExportError
from lit_distill.models.loading import DTYPES


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_adapter(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    """Write the LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``) and the tokenizer."""
    if not is_lora(model):
        raise ExportError("format 'adapter' needs a LoRA model (a checkpoint or adapter directory of a run with "
                          "`lora:`); this source has no adapter: export 'merged' or 'gguf' instead")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def merged_model(model: nn.Module) -> nn.Module:
    """The plain transformers model with any LoRA adapter folded into its weights (``model`` itself when none)."""
    return copy.deepcopy(model).merge_and_unload() if is_lora(model) else model


def save_merged(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, dtype: str) -> Path:
    """Write a merged model in ``dtype``, loadable by ``AutoModelForCausalLM.from_pretrained`` alone.

    The model is cast in place (callers write their float32 exports first).
    """
    model.to(DTYPES[dtype])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def check_merged_4bit() -> None:
    """Fail early, with the way out, where bitsandbytes 4-bit cannot run."""
    if not torch.cuda.is_available():
        raise ExportError("format 'merged-4bit' quantises with bitsandbytes (NF4), which needs a CUDA GPU, and none "
                          "is visible here; on CPU export GGUF instead (--formats gguf --gguf-types q4_k_m)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ExportError("format 'merged-4bit' needs the bitsandbytes package: pip install bitsandbytes")


def save_merged_4bit(merged_dir: Path, tokenizer: PreTrainedTokenizerBase, path: Path, compute_dtype: str) -> Path:
    """Reload a saved 16-bit merged model quantised to bitsandbytes NF4 on the GPU and save it (needs CUDA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_merged_4bit()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=DTYPES[compute_dtype])
    model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=config, device_map={"": 0})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
