"""Tokenise (prompt, completion) pairs and collate them into padded batches; the DataModule skeleton around them.

Prompt and completion are tokenised separately and concatenated: tokenising ``prompt + completion`` as one
string lets BPE merge across the boundary (``"... Ash" + "ford"`` becomes one ``Ashford`` token), so the
trained completion tokens would differ from those the model has to generate after the prompt. The completion
ends with the EOS id, which the labels keep even where ``pad_token_id == eos_token_id``: padding is located
by length, never by value.

Shapes: B batch, T sequence length, P prompt length.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_distill.rollout import left_pad

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Truncation = Literal["left_prompt", "error"]


class EncodingError(ValueError):
    """An example that cannot be encoded (empty prompt, too long, ...); callers count a skip or raise."""


class TooLongError(EncodingError):
    """Prompt + completion do not fit in ``max_length`` (with the prompt truncated, if truncation is allowed)."""


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` alone; no BOS/EOS (chat templates write their own special tokens into the text)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_completion(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """Token ids of ``completion`` followed by EOS, so the model learns to stop."""
    return tokenize(tokenizer, completion) + [tokenizer.eos_token_id]


def fit_prompt(prompt_ids: list[int], completion_length: int, max_length: int,
               truncation: Truncation = "left_prompt") -> list[int]:
    """``prompt_ids``, cut from the left so that prompt + completion fit in ``max_length``.

    The prompt keeps at least one token: the first completion token is only trained (and generated) when
    some token precedes it.

    Raises:
        EncodingError: the prompt is empty.
        TooLongError: the completion alone leaves no room for a prompt token, or ``truncation="error"`` and
            the pair is too long.
    """
    if truncation not in ("left_prompt", "error"):
        raise ValueError(f"truncation must be 'left_prompt' or 'error', got '{truncation}'")
    if not prompt_ids:
        raise EncodingError("the prompt is empty")
    overflow = len(prompt_ids) + completion_length - max_length
    if overflow <= 0:
        return prompt_ids
    if truncation == "error":
        raise TooLongError(f"prompt + completion is longer than max_length={max_length} (truncation='error')")
    if completion_length >= max_length:
        raise TooLongError(f"the completion alone (EOS included) leaves no room for a prompt token in "
                            f"max_length={max_length}")
    # The end of the prompt (the question, the chat turn header) matters most for the completion.
    return prompt_ids[overflow:]


def join(prompt_ids: list[int], completion_ids: list[int]) -> dict[str, list[int]]:
    """``input_ids`` = prompt + completion; ``labels`` = the same with the prompt masked by -100."""
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int,
                truncation: Truncation = "left_prompt") -> dict[str, list[int]]:
    """Tokenise one SFT pair (separately, then concatenated; the completion ends with EOS).

    Args:
        prompt: the formatted prompt (see :func:`lit_distill.data.chat.format_prompt`).
        completion: the target text; it should start as it would continue the prompt (e.g. with a space).
        max_length: longest ``input_ids``.
        truncation: ``"left_prompt"`` drops prompt tokens from the left while the completion fits;
            ``"error"`` raises instead.

    Returns:
        ``input_ids`` and ``labels`` (-100 on prompt tokens) of equal length, and ``prompt_ids`` (the prompt
        as used, after truncation) for generation.

    Raises:
        EncodingError: see :func:`fit_prompt`.
    """
    return encode_pair_ids(tokenize(tokenizer, prompt), tokenize_completion(tokenizer, completion), max_length,
                           truncation)


def encode_pair_ids(prompt_ids: list[int], completion_ids: list[int], max_length: int,
                    truncation: Truncation = "left_prompt") -> dict[str, list[int]]:
    """:func:`encode_pair` of already tokenised parts (``completion_ids`` with its end token)."""
    prompt_ids = fit_prompt(prompt_ids, len(completion_ids), max_length, truncation)
    return {**join(prompt_ids, completion_ids), "prompt_ids": prompt_ids}


def encode_preference(tokenizer: PreTrainedTokenizerBase, prompt: str, chosen: str, rejected: str,
                      max_length: int, truncation: Truncation = "left_prompt") -> dict[str, list[int]]:
    """Tokenise a preference pair: ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels`` and ``prompt_ids``.

    Both sides share one prompt, truncated for the longer completion, so that they condition on the same
    tokens (the DPO log-ratio compares the two completions under one prompt).

    Raises:
        EncodingError: see :func:`fit_prompt`.
    """
    return encode_preference_ids(tokenize(tokenizer, prompt), tokenize_completion(tokenizer, chosen),
                                 tokenize_completion(tokenizer, rejected), max_length, truncation)


def encode_preference_ids(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int,
                          truncation: Truncation = "left_prompt") -> dict[str, list[int]]:
    """:func:`encode_preference` of already tokenised parts (completions with their end tokens)."""
    prompt_ids = fit_prompt(prompt_ids, max(len(chosen_ids), len(rejected_ids)), max_length, truncation)
    chosen_pair, rejected_pair = join(prompt_ids, chosen_ids), join(prompt_ids, rejected_ids)
    return {"chosen_input_ids": chosen_pair["input_ids"], "chosen_labels": chosen_pair["labels"],
            "rejected_input_ids": rejected_pair["input_ids"], "rejected_labels": rejected_pair["labels"],
            "prompt_ids": prompt_ids}


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None) -> Tensor:
    """(B, T) long tensor of ``sequences`` padded on the right with ``pad_id`` to ``length`` (default: longest)."""
    length = max(len(ids) for ids in sequences) if length is None else length
    padded = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # (B, T)
    for row, ids in enumerate(sequences):
        padded[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return padded


def _attention_mask(sequences: Sequence[Sequence[int]], length: Optional[int] = None) -> Tensor:
    return pad_right([[1] * len(ids) for ids in sequences], 0, length)  # (B, T)


def collate_sft(examples: list[dict], pad_token_id: int, with_prompts: bool = False,
                metadata: Sequence[tuple[str, str]] = ()) -> dict:
    """Batch encoded SFT examples (from :func:`encode_pair`).

    Args:
        examples: dicts with ``input_ids``, ``labels`` and, if ``with_prompts``, ``prompt_ids``.
        pad_token_id: id written into the padding (its labels are -100 whatever its value).
        with_prompts: add the left-padded prompts, for generation during evaluation.
        metadata: ``(example_key, batch_key)`` pairs of per-example values gathered into lists, e.g.
            ``(("id", "ids"),)``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: (B, T) right-padded; with prompts also
        ``prompt_input_ids``, ``prompt_attention_mask``: (B, P) left-padded; plus the metadata lists.
    """
    input_ids = [example["input_ids"] for example in examples]
    batch = {"input_ids": pad_right(input_ids, pad_token_id), "attention_mask": _attention_mask(input_ids),
             "labels": pad_right([example["labels"] for example in examples], IGNORE_INDEX)}
    if with_prompts:
        batch["prompt_input_ids"], batch["prompt_attention_mask"] = left_pad(
            [example["prompt_ids"] for example in examples], pad_token_id)
    for example_key, batch_key in metadata:
        batch[batch_key] = [example[example_key] for example in examples]
    return batch


def collate_preference(examples: list[dict], pad_token_id: int) -> dict[str, Tensor]:
    """Batch encoded preference pairs (from :func:`encode_preference`, plus an optional ``margin``).

    Chosen and rejected sides are padded to one common length T, so a module can concatenate them into one
    (2B, T) forward pass.

    Returns:
        ``{chosen,rejected}_{input_ids,attention_mask,labels}``: (B, T) right-padded, labels -100 on prompt and
        padding; ``margin``: (B,) float, 0 where an example has none.
    """
    sides = {side: [example[f"{side}_input_ids"] for example in examples] for side in ("chosen", "rejected")}
    length = max(len(ids) for ids in sides["chosen"] + sides["rejected"])
    batch = {}
    for side, input_ids in sides.items():
        batch[f"{side}_input_ids"] = pad_right(input_ids, pad_token_id, length)
        batch[f"{side}_attention_mask"] = _attention_mask(input_ids, length)
        batch[f"{side}_labels"] = pad_right([example[f"{side}_labels"] for example in examples], IGNORE_INDEX, length)
    batch["margin"] = torch.tensor([float(example.get("margin", 0.0)) for example in examples])  # (B,)
    return batch


@dataclass
class SkipLog:
    """Examples left out while building a split, counted by reason and reported in one warning."""

    what: str  # e.g. "train split of 'data/pairs.jsonl'"
    reasons: Counter = field(default_factory=Counter)
    where: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.reasons[reason] += 1
        self.where.append(where)

    def report(self, total: int, first: int = 5) -> None:
        """Log one warning (count, reasons, the first few examples) if anything was skipped."""
        if self.where:
            reasons = "; ".join(f"{reason}: {count}" for reason, count in self.reasons.most_common())
            log.warning("skipped %d of %d examples of the %s (%s); first: %s", len(self.where), total, self.what,
                        reasons, ", ".join(self.where[:first]))


def holdout(items: list, split: str, validation_fraction: float) -> list:
    """One split of a single-file source: the first ``validation_fraction`` is validation, the rest train; no test."""
    num_validation = int(len(items) * validation_fraction)
    return {"train": items[num_validation:], "validation": items[:num_validation], "test": []}[split]
