"""Sampling speed: ``lit_distill.rollout.generate`` against Hugging Face ``model.generate``, same model, same batch.

``python -m lit_distill.bench sampling [--model smollm2]``: the workload's ``policy/`` (the random tiny Llama, or
SmolLM2-135M-Instruct in fp32) in eval mode completes the same left-padded batch: the first
``--sampling-batch-size`` prompts of ``prompts.jsonl`` (8 by default), each tokenised alone, without special tokens.
Each engine writes exactly ``--sampling-new-tokens`` tokens per row (64 by default): no EOS ends a row (``generate``
with ``eos_token_id=[]``, HF's with ``eos_token_id=None``), so both do the same work. Modes
(``--sampling-modes``):

* ``greedy``: argmax decoding (ours ``do_sample=False``, HF's ``do_sample=False``). Both must write the same tokens;
  the table's "same" column is the fraction of rows whose completions are identical (1.00 expected; a near-tie
  between two logits can flip an argmax under a different summation order and make a row diverge from there).
* ``sampled``: multinomial sampling at temperature 1, no top-k, no top-p (HF's ``top_k=0, top_p=1.0``).
* ``eos`` (not run by default): sampled, and the last V / ``--sampling-eos-fraction`` token ids end a completion,
  so rows end after about that many tokens with geometric spread, like RL completions of varied length (the two
  engines draw different random streams, hence different lengths: compare tokens/s). Ours leaves finished rows.

tokens/s = completion tokens (up to and including EOS) / wall time of one call. After one untimed call of each, the
engines alternate (ours, HF, ours, HF, ...) for ``--rounds`` rounds (``timing.interleave``); the table gives the
median tokens/s of each and the median of the per-round ratios ours / HF. Ours also records the sampled tokens'
log-probs; HF's returns the tokens only.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field

import torch

from lit_distill.bench import timing
from lit_distill.bench.workload import Options, Workload

NEEDS_WORKLOAD = True
MODES = ("greedy", "sampled", "eos")


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in text.split(","))
    if unknown := [mode for mode in modes if mode not in MODES]:
        raise ValueError(f"unknown sampling mode(s) {unknown}; choose from {MODES}")
    return modes


@dataclass(frozen=True)
class Settings:
    batch_size: int = field(default=8, metadata={"help": "prompts per batch"})
    new_tokens: int = field(default=64, metadata={"help": "tokens generated per prompt"})
    modes: tuple[str, ...] = field(default=("greedy", "sampled"),
                                   metadata={"parse": parse_modes, "help": f"comma-separated, of {', '.join(MODES)}"})
    eos_fraction: int = field(default=16, metadata={"help": "eos mode: the last V / this many token ids are EOS"})


def prompt_batch(workload: Workload, batch_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(input_ids (B, P), attention_mask (B, P), tokenizer): the first ``batch_size`` prompts, left-padded."""
    from lit_distill.models.loading import load_tokenizer
    from lit_distill.rollout import left_pad

    tokenizer = load_tokenizer(workload.tokenizer)
    rows = workload.read("prompts")[:batch_size]
    if len(rows) < batch_size:
        raise ValueError(f"{workload.rows('prompts')} has {len(rows)} rows, fewer than the batch size {batch_size}")
    prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    return input_ids.to(device), attention_mask.to(device), tokenizer


def completion_tokens(completions: torch.Tensor, eos: list[int]) -> int:
    """Tokens of (B, N) completions up to and including each row's first EOS (all N without one)."""
    if not eos:
        return completions.numel()
    ended = torch.isin(completions, torch.tensor(eos, device=completions.device))  # (B, N)
    lengths = torch.where(ended.any(-1), ended.int().argmax(-1) + 1, completions.size(1))  # (B,)
    return int(lengths.sum())


def engines(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, greedy: bool,
            eos: list[int], pad_token_id: int, seed: int) -> dict:
    """``{"ours": run, "hf": run}``: ``run()`` generates once and returns its completions (B, N)."""
    from lit_distill.rollout import generate

    calls = {"ours": 0, "hf": 0}  # a fresh random stream per call

    def ours() -> torch.Tensor:
        calls["ours"] += 1
        generator = torch.Generator(input_ids.device).manual_seed(seed + calls["ours"])
        return generate(model, input_ids, attention_mask, max_new_tokens=new_tokens, eos_token_id=eos,
                        pad_token_id=pad_token_id, do_sample=not greedy, temperature=1.0, top_k=0, top_p=1.0,
                        generator=generator).completions

    def hf() -> torch.Tensor:
        calls["hf"] += 1
        torch.manual_seed(seed + calls["hf"])
        sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        # eos_token_id=None as a keyword (not in a GenerationConfig, where None is filled from the model's) disables
        # EOS; min_new_tokens=0 lets a row stop at its first EOS as ours does.
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=not greedy,
                                   max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=eos or None,
                                   pad_token_id=pad_token_id, **sampling)
        completions = sequences[:, input_ids.size(1):]  # (B, <= N)
        if not eos and completions.size(1) != new_tokens:
            raise RuntimeError(f"HF generate wrote {completions.size(1)} tokens per row, expected {new_tokens}")
        return completions

    return {"ours": ours, "hf": hf}


def timed(run, eos: list[int], device: str, outputs: list):
    """A candidate for ``timing.interleave``: one call of ``run``, its tokens/s; the completions go to ``outputs``."""
    def candidate() -> float:
        timing.synchronize(device)
        start = time.perf_counter()
        completions = run()
        timing.synchronize(device)
        elapsed = time.perf_counter() - start
        outputs.append(completions)
        return completion_tokens(completions, eos) / elapsed

    return candidate


@torch.no_grad()
def measure(workload: Workload, options: Options, settings: Settings, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM

    from lit_distill.models.loading import count_parameters

    # transformers 5 renamed the forward's `past_key_values` (which generate passes) to `cache`: known, harmless.
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    model = AutoModelForCausalLM.from_pretrained(workload.model("policy"), dtype=torch.float32)
    model = model.to(options.device).eval()
    input_ids, attention_mask, tokenizer = prompt_batch(workload, settings.batch_size, options.device)
    vocab = model.config.vocab_size
    rows = []
    for mode in settings.modes:
        eos = list(range(vocab - vocab // settings.eos_fraction, vocab)) if mode == "eos" else []
        runs = engines(model, input_ids, attention_mask, settings.new_tokens, mode == "greedy", eos,
                       tokenizer.pad_token_id, options.seed)
        outputs = {name: [] for name in runs}
        candidates = {name: timed(run, eos, options.device, outputs[name]) for name, run in runs.items()}
        for candidate in candidates.values():  # untimed warm-up
            candidate()
        comparison = timing.interleave(candidates, rounds)
        row = {"mode": mode, "rounds": comparison.rounds, "ours_tokens_per_s": comparison.median("ours"),
               "hf_tokens_per_s": comparison.median("hf"), "ratio": comparison.ratio("ours", "hf")}
        if mode == "greedy":
            ours, hf = outputs["ours"][-1], outputs["hf"][-1]
            row["same_rows"] = (ours == hf).all(-1).float().mean().item()
        rows.append(row)
    return {"settings": dataclasses.asdict(settings), "model": workload.model("policy"),
            "params": count_parameters(model), "vocab_size": vocab, "prompt_length": input_ids.size(1),
            "device": options.device, "rows": rows}


def table(result: dict) -> str:
    settings = result["settings"]
    lines = [f"Sampling, {result['model']} ({result['params']:,} params, V={result['vocab_size']}), "
             f"B={settings['batch_size']} prompts of <= {result['prompt_length']} tokens (left-padded), "
             f"{settings['new_tokens']} new tokens each, fp32, {result['device']}; median of "
             f"{len(result['rows'][0]['rounds']['ours']) if result['rows'] else 0} interleaved calls",
             "| mode | ours tokens/s | HF tokens/s | ours / HF | same greedy rows |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        same = f"{row['same_rows']:.2f}" if "same_rows" in row else "—"
        lines.append(f"| {row['mode']} | {row['ours_tokens_per_s']:.0f} | {row['hf_tokens_per_s']:.0f} | "
                     f"{row['ratio']:.2f}× | {same} |")
    return "\n".join(lines)
