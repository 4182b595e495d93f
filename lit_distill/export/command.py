"""``python -m lit_distill export SOURCE --output DIR [--formats ...]`` (also ``lit-distill export ...``).

    python -m lit_distill export runs/quickstart/student --output runs/quickstart/export \\
        --formats merged gguf --gguf-types f16 q8_0 q4_k_m
    python -m lit_distill export runs/dpo/checkpoints/last.ckpt --output runs/dpo/export --formats adapter merged
    python -m lit_distill export lit-distill/tiny-teacher --output /tmp/teacher --formats gguf --gguf-types q8_0

SOURCE: a Lightning ``.ckpt`` written while fitting, a directory written by a module's ``save_dir`` (a peft
adapter directory for a LoRA run) or by transformers, a hub id, a ``.gguf`` file, or an alias such as
``lit-distill/tiny-teacher``.

Formats (written under DIR): ``adapter/`` the LoRA adapter in peft format (LoRA sources only); ``merged/`` the
adapter folded into the weights, in ``--dtype``, loadable with plain transformers; ``merged-4bit/`` the same
quantised by bitsandbytes to NF4 (needs a CUDA GPU); ``gguf/NAME-TYPE.gguf`` for llama.cpp and Ollama, by
llama.cpp's own converter (f32, f16, bf16, q8_0) and quantizer (q4_k_m, needs ``pip install
'lit_distill[gguf-quantize]'``). Tokenizer and chat template (``--chat-template``) go with every format.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from lit_distill.export import EXPORT_ERRORS, FORMATS, GGUF_TYPES, MERGED_DTYPES, export


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lit_distill export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="Lightning .ckpt, saved or adapter directory, hub id, .gguf file or alias")
    parser.add_argument("--output", required=True, help="directory to write the formats into")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=["merged", "gguf"],
                        help="what to write (default: merged gguf)")
    parser.add_argument("--dtype", choices=MERGED_DTYPES, default="float16",
                        help="dtype of merged/ and compute dtype of merged-4bit/ (default: float16)")
    parser.add_argument("--gguf-types", nargs="+", choices=GGUF_TYPES, default=["f16"],
                        help="GGUF file types (default: f16); q4_k_m needs llama-cpp-python")
    parser.add_argument("--chat-template", default="default",
                        help="'default' (the tokenizer's, else the package's, as in training), 'none', or a Jinja "
                             "template file")
    parser.add_argument("--name", default="model", help="GGUF file stem and general.name (default: model)")
    return parser.parse_args(argv)


def run(argv: Optional[list[str]] = None) -> dict:
    """Parse ``argv`` and export; prints each written path. Raises one of ``EXPORT_ERRORS`` on bad input."""
    args = parse_args(argv)
    start = time.perf_counter()
    written = export(args.source, args.output, args.formats, dtype=args.dtype, gguf_types=args.gguf_types,
                     chat_template=args.chat_template, name=args.name)
    for export_format, paths in written.items():
        for path in paths:
            print(f"{export_format}: {path}")
    print(f"exported in {time.perf_counter() - start:.1f} s")
    return written


def main(argv: Optional[list[str]] = None) -> None:
    """The command line: user errors end the process with one line, ``error: ...``."""
    try:
        run(argv)
    except EXPORT_ERRORS as err:
        sys.exit(f"error: {err}")
