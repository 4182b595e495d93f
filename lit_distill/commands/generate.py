"""Generate completions from a saved model or a Lightning checkpoint; prints one JSON line per prompt.

    python -m lit_distill generate runs/sft/model --prompt "Where does Anna live?" --prompt "Who is Tom?"
    python -m lit_distill generate lit-distill/tiny-teacher --prompts-file prompts.txt --chat-template none
    python -m lit_distill generate smollm2-135m-instruct --prompts-file eval.jsonl --sample --temperature 0.7 --top-p 0.9 \\
        --seed 0 --max-new-tokens 128 --batch-size 16 --output completions.jsonl
    python -m lit_distill generate runs/dpo/checkpoints/last.ckpt --prompt "Question: ..." --device cuda

MODEL is any source :class:`~lit_distill.models.loading.ModelSpec` accepts (a directory written by one of our
modules' ``save_pretrained`` or by transformers, a hub id, a ``.gguf`` file, an alias such as
``lit-distill/tiny-teacher``) or a ``.ckpt`` file written by Lightning while fitting SFTModule, DistillModule,
DPOModule or RewardModule.

Checkpoints: only the *trained* model is rebuilt from the checkpoint's hyper-parameters and ``state_dict``, not the
whole LightningModule (no teacher or reference copy), by
:func:`~lit_distill.models.loading.load_trained_model`, which ``python -m lit_distill export`` shares. The checkpoint
is read with ``torch.load(weights_only=False)``: only load checkpoints you trust.

Prompts: ``--prompt`` (repeatable) and ``--prompts-file`` (one prompt per line, blank lines skipped; or a
``.jsonl`` file whose lines are objects with a ``prompt`` field), in that order. Each is formatted with
``format_prompt(--chat-template)`` (``none``: raw text, the default; ``default``: the tokenizer's chat template or
the package's; or a Jinja template file), tokenized without special tokens (as the DataModules do), left-padded in
batches of ``--batch-size`` and completed by :func:`lit_distill.rollout.generate` with a KV cache. Greedy by
default; ``--sample`` draws with ``--temperature``, ``--top-k``, ``--top-p`` from a generator seeded with
``--seed``. Left padding with mask-derived positions makes greedy completions independent of ``--batch-size``.

Output: ``{"prompt": <the prompt as given>, "completion": <decoded up to EOS, special tokens skipped>}`` per line,
to stdout or ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

class GenerateError(ValueError):
    """A user-facing error (bad path, empty prompts): printed without a traceback by the command line."""


# ---- model loading ------------------------------------------------------------------------------------------------
def load_model(source: str, dtype: str = "float32"):
    """(model, tokenizer) from a ``.ckpt`` file or any ModelSpec source, in eval mode (see the module docstring)."""
    from lit_distill.models.loading import ModelSourceError, load_trained_model

    try:
        return load_trained_model(source, dtype)
    except ModelSourceError as err:
        raise GenerateError(str(err)) from err


# ---- generation ---------------------------------------------------------------------------------------------------
def complete(model, tokenizer, prompts: list[str], *, chat_template: str = "none", max_new_tokens: int = 64,
             batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_strings: tuple[str, ...] = (),
             device: str = "cpu") -> list[str]:
    """Completions of ``prompts`` (in order), generated in left-padded batches; each ends at the model's end
    tokens (the tokenizer's EOS and the generation config's, e.g. <|im_end|>) or with the token that completes one
    of ``stop_strings``."""
    from lit_distill.data.chat import format_prompt
    from lit_distill.models.loading import eos_token_ids
    from lit_distill.rollout import generate
    from lit_distill.rollout.sampling import left_pad

    generator = torch.Generator(device).manual_seed(seed) if do_sample else None
    completions = []
    for start in range(0, len(prompts), batch_size):
        texts = [format_prompt(tokenizer, prompt, chat_template) for prompt in prompts[start:start + batch_size]]
        token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for offset, ids in enumerate(token_ids):
            if not ids:
                raise GenerateError(f"prompt {start + offset + 1} is empty once formatted and tokenized")
        input_ids, attention_mask = left_pad(token_ids, tokenizer.pad_token_id)  # (B, P)
        rollout = generate(model, input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                           temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                           generator=generator, stop_strings=stop_strings, tokenizer=tokenizer)
        completions += [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                        for ids, mask in zip(rollout.completions.cpu(), rollout.completion_mask.cpu())]
    return completions


# ---- command line -------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lit_distill generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="saved model directory, hub id, .gguf file, alias, or Lightning .ckpt")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or .jsonl with a 'prompt' field")
    parser.add_argument("--chat-template", default="none",
                        help="'none' (raw prompts, default), 'default' (the tokenizer's or the package's), or a "
                             "Jinja template file")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--stop", action="append", default=[],
                        help="end a completion with the token that completes this string (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--output", type=Path, help="write the JSON lines here instead of stdout")
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompts_file:
        parser.error("give at least one --prompt or a --prompts-file")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be >= 1")
    if not args.sample and (args.top_k or args.top_p != 1.0):
        parser.error("--top-k / --top-p need --sample")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    """Run the command line; returns the written rows. Raises :class:`GenerateError` on bad input."""
    args = parse_args(argv)
    from lit_distill.data.io import DataFileError, read_prompts_file

    try:
        prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    except (DataFileError, FileNotFoundError) as err:
        raise GenerateError(str(err)) from err
    model, tokenizer = load_model(args.model, args.dtype)
    model.to(args.device)
    completions = complete(model, tokenizer, prompts, chat_template=args.chat_template,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.sample,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           stop_strings=tuple(args.stop), device=args.device)
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return rows

