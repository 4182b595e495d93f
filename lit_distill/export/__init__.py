"""Export a trained model for deployment: LoRA adapter (peft), merged 16-bit HF weights, merged 4-bit, GGUF.

``python -m lit_distill export SOURCE --output DIR --formats adapter merged gguf`` (see :mod:`.command`), or
:func:`export` from Python. SOURCE is anything :func:`~lit_distill.models.loading.load_trained_model` reads: a
Lightning ``.ckpt``, a ``save_pretrained`` or peft adapter directory, a hub id, a ``.gguf`` file or an alias.

Layout of DIR: ``adapter/`` (LoRA sources only), ``merged/`` (``--dtype``), ``merged-4bit/`` (CUDA only),
``gguf/{name}-{type}.gguf``. Every export carries the tokenizer and the chat template.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lit_distill.data.chat import resolve_chat_template
from lit_distill.export.errors import ExportError
from lit_distill.export.gguf import GGUF_TYPES, check_gguf_types, export_gguf
from lit_distill.export.hf import check_merged_4bit, merged_model, save_adapter, save_merged, save_merged_4bit
from lit_distill.models.loading import ModelSourceError, load_trained_model

FORMATS = ("adapter", "merged", "merged-4bit", "gguf")
MERGED_DTYPES = ("float16", "bfloat16", "float32")
# Errors a user can cause; the command line prints them without a traceback.
EXPORT_ERRORS = (ModelSourceError, ExportError)


def export(source: str, output_dir: str, formats: list[str], dtype: str = "float16",
           gguf_types: tuple[str, ...] = ("f16",), chat_template: str = "default",
           name: str = "model") -> dict[str, list[Path]]:
    """Write the requested formats of ``source`` under ``output_dir`` (layout in the module docstring).

    Args:
        source: a Lightning ``.ckpt``, a saved or adapter directory, a hub id, a ``.gguf`` file or an alias.
        output_dir: created if missing; existing files of the same names are overwritten.
        formats: some of :data:`FORMATS`.
        dtype: dtype of ``merged/`` (and the compute dtype of ``merged-4bit/``).
        gguf_types: some of :data:`~lit_distill.export.gguf.GGUF_TYPES`, for format ``gguf``.
        chat_template: ``"default"`` (the tokenizer's template, else the package's), ``"none"``, or a Jinja
            template file; see :func:`~lit_distill.data.chat.resolve_chat_template`.
        name: GGUF file stem and ``general.name``.

    Returns:
        The written paths by format.

    Raises:
        One of :data:`EXPORT_ERRORS`, before anything is written when the request itself is impossible.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError(f"unknown or no export format(s) {unknown}; expected some of {list(FORMATS)}")
    if dtype not in MERGED_DTYPES:
        raise ExportError(f"dtype '{dtype}' is not one of {list(MERGED_DTYPES)}")
    if "gguf" in formats:
        check_gguf_types(list(gguf_types))
    if "merged-4bit" in formats:
        check_merged_4bit()
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ExportError(f"--output '{output_dir}' is a file; the export needs a directory (created if missing)")
    model, tokenizer = load_trained_model(source)
    try:
        tokenizer.chat_template = resolve_chat_template(tokenizer, chat_template)
    except FileNotFoundError as err:
        raise ExportError(str(err)) from err
    output = Path(output_dir)
    written: dict[str, list[Path]] = {}
    if "adapter" in formats:
        written["adapter"] = [save_adapter(model, tokenizer, output / "adapter")]
    merged = merged_model(model)
    with tempfile.TemporaryDirectory(prefix="lit-distill-export-") as scratch:
        scratch = Path(scratch)
        if "gguf" in formats:
            # The converter reads a float32 directory: every GGUF type is made from full-precision weights.
            float_dir = scratch / "float32"
            merged.save_pretrained(float_dir)
            tokenizer.save_pretrained(float_dir)
            written["gguf"] = export_gguf(float_dir, output / "gguf", list(gguf_types), name, scratch)
        if "merged" in formats or "merged-4bit" in formats:
            merged_dir = output / "merged" if "merged" in formats else scratch / "merged"
            save_merged(merged, tokenizer, merged_dir, dtype)
            if "merged" in formats:
                written["merged"] = [merged_dir]
            if "merged-4bit" in formats:
                written["merged-4bit"] = [save_merged_4bit(merged_dir, tokenizer, output / "merged-4bit", dtype)]
    return written


__all__ = ["EXPORT_ERRORS", "ExportError", "FORMATS", "GGUF_TYPES", "MERGED_DTYPES", "export"]
