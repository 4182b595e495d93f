"""Preference pairs (prompt, chosen, rejected) for DPO and reward modelling, or unpaired labelled completions
(prompt, completion, label) for KTO.

Two DataModules with one batch format each for pairs and for unpaired rows (``unpaired=True``):
  * :class:`SQuADPreferenceDataModule` builds pairs from SQuAD-style QA (any source of
    :class:`~lit_distill.data.squad.SQuADDataModule`): chosen is the gold answer, rejected a seeded corruption
    of it, so the embedded corpus gives offline preference data whose "right" answer is checkable;
  * :class:`JSONLPreferenceDataModule` reads pairs written by someone else (``{"prompt", "chosen",
    "rejected", "margin"?}`` per line), or TRL's unpaired rows ``{"prompt", "completion", "label": bool}``, with
    per-line validation.

Unpaired batches (:func:`collate_unpaired`) also carry KTO's mismatched ``kl_*`` sequences: each prompt followed by
another row's completion. SQuAD pairs made unpaired give each pair's two rows (label True for chosen, False for
rejected), as TRL's ``unpair_preference_dataset`` does.

They are two classes rather than one with a ``.jsonl`` source because their options do not overlap
(corruptions and prompt templates vs. ``on_invalid``), and a YAML config should only offer what applies.
"""

from __future__ import annotations

import random
import re
import string
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from lit_distill.data import corpus
from lit_distill.data.base import EncodedDataModule
from lit_distill.data.chat import format_prompt
import torch

from lit_distill.data.collate import (IGNORE_INDEX, EncodingError, SkipLog, Truncation, collate_preference,
                                      encode_preference_ids, fit_prompt, holdout, join, pad_right, tokenize,
                                      tokenize_completion)
from lit_distill.data.io import DataFileError, find_split_file, read_numbered_jsonl
from lit_distill.data.squad import DEFAULT_PROMPT_TEMPLATE, SQuADDataModule, SQuADExample
from lit_distill.models.loading import load_tokenizer

# ---- corruptions of a gold answer ---------------------------------------------------------------------------

# Values the embedded corpus asks about, by kind: another value of the same kind in the context is the
# hardest wrong answer (a different town, colour, name...).
CORPUS_KINDS = (corpus.NAMES, corpus.CITIES, corpus.JOBS, corpus.ANIMALS, corpus.COLOURS, corpus.PET_NAMES,
                corpus.FOODS)
# Function words never make a wrong span on their own ("She", "in", "the").
STOPWORDS = frozenset("a an the he she his her him it its they them their and or but of in on at to is was are "
                      "were be as by for with from that this these those which who whom what".split())
WORD = re.compile(r"\w+(?:['-]\w+)*")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalize_answer(text: str) -> str:
    """SQuAD evaluation normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(char for char in text.lower() if char not in string.punctuation)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def is_wrong(candidate: str, answers: Sequence[str]) -> bool:
    """True when ``candidate`` is non-empty and, once normalised, equals none of the gold ``answers``."""
    normalized = normalize_answer(candidate)
    return bool(normalized) and all(normalized != normalize_answer(answer) for answer in answers)


def _span_kind(text: str) -> str:
    words = text.split()
    if all(re.fullmatch(r"\d[\d,.]*", word) for word in words):
        return "number"
    return "name" if all(word[:1].isupper() for word in words) else "word"


def wrong_span(example: SQuADExample, examples: Sequence[SQuADExample], rng: random.Random) -> Optional[str]:
    """Another value from the same context, the closest kind first: a corpus value of the gold's kind (another
    town for a town), then any corpus value of the same shape, then any span of as many words and the same
    shape (number, capitalised name, lower-case words) that neither starts nor ends with a function word."""
    gold = example.answers[0].strip()
    normalized_gold, shape = normalize_answer(gold), _span_kind(gold)

    def unrelated(candidate: str) -> bool:
        # Neither part of the gold answer nor containing it ("cake" for "lemon cake" is not another value).
        normalized = normalize_answer(candidate)
        return (is_wrong(candidate, example.answers) and f" {normalized} " not in f" {normalized_gold} "
                and f" {normalized_gold} " not in f" {normalized} ")

    # The substring test first: the word-boundary regex is only run for the few values that can match.
    present = [value for values in CORPUS_KINDS for value in values if value in example.context
               and re.search(rf"\b{re.escape(value)}\b", example.context) and unrelated(value)]
    gold_kinds = [values for values in CORPUS_KINDS if gold in values]
    spans = []
    for sentence in SENTENCE_END.split(example.context):
        words = WORD.findall(sentence)
        spans += [" ".join(words[i:i + len(gold.split())]) for i in range(len(words) - len(gold.split()) + 1)]
    tiers = ([value for value in present if any(value in values for values in gold_kinds)],
             [value for value in present if _span_kind(value) == shape],
             [span for span in spans if _span_kind(span) == shape and unrelated(span)
              and not {span.split()[0].lower(), span.split()[-1].lower()} & STOPWORDS])
    for candidates in tiers:
        if candidates:
            return rng.choice(list(dict.fromkeys(candidates)))  # deduplicated in first-occurrence order
    return None


def other_question(example: SQuADExample, examples: Sequence[SQuADExample], rng: random.Random,
                   tries: int = 16) -> Optional[str]:
    """The gold answer of another example of the split (a fluent answer to a different question)."""
    for _ in range(tries):
        other = examples[rng.randrange(len(examples))]
        if is_wrong(other.answers[0], example.answers):
            return other.answers[0].strip()
    return None


def truncated(example: SQuADExample, examples: Sequence[SQuADExample], rng: random.Random) -> Optional[str]:
    """The first half of the answer's words, or of a one-word answer's characters."""
    gold = example.answers[0].strip()
    words = gold.split()
    if len(words) > 1:
        return " ".join(words[:len(words) // 2])
    return gold[:len(gold) // 2] or None


def shuffled(example: SQuADExample, examples: Sequence[SQuADExample], rng: random.Random) -> Optional[str]:
    """The answer's words in a new order, or a one-word answer's characters (the new order differs ignoring
    case: "coCo" is no corruption of "Coco")."""
    gold = example.answers[0].strip()
    words = gold.split()
    units, separator = (words, " ") if len(words) > 1 else (list(gold), "")
    lowered = [unit.lower() for unit in units]
    if len(set(lowered)) < 2:
        return None  # every order is the same
    order = list(range(len(units)))
    rng.shuffle(order)
    if [lowered[i] for i in order] == lowered:
        order = order[1:] + order[:1]  # a rotation of a sequence with two distinct elements always differs
    return separator.join(units[i] for i in order)


CORRUPTIONS: dict[str, Callable[[SQuADExample, Sequence[SQuADExample], random.Random], Optional[str]]] = {
    "wrong_span": wrong_span, "other_question": other_question, "truncated": truncated, "shuffled": shuffled}


def corrupt(example: SQuADExample, examples: Sequence[SQuADExample], rng: random.Random,
            corruptions: Sequence[str], weights: Sequence[float]) -> Optional[tuple[str, str]]:
    """``(corruption, rejected)``: a corruption drawn by weight; one that does not apply to this example (or
    yields a gold answer after SQuAD normalisation, e.g. "the cat" shuffled to "cat the") is dropped and another
    drawn. None when no corruption applies. The functions of :data:`CORRUPTIONS` propose candidates; this is
    the one place that guarantees ``rejected`` is wrong."""
    remaining = [(name, weight) for name, weight in zip(corruptions, weights) if weight > 0]
    while remaining:
        index = rng.choices(range(len(remaining)), weights=[weight for _, weight in remaining])[0]
        name, _ = remaining.pop(index)
        rejected = CORRUPTIONS[name](example, examples, rng)
        if rejected is not None and is_wrong(rejected, example.answers):
            return name, rejected
    return None


# ---- DataModules ----------------------------------------------------------------------------------------------

def preference_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int,
                    truncation: Truncation) -> dict:
    """:func:`~lit_distill.data.collate.encode_preference_ids` of the texts, with ``truncated``: whether the prompt
    was cut to fit."""
    prompt_ids = tokenize(tokenizer, prompt)
    pair = encode_preference_ids(prompt_ids, tokenize_completion(tokenizer, chosen),
                                 tokenize_completion(tokenizer, rejected), max_length, truncation)
    return {**pair, "truncated": len(pair["prompt_ids"]) < len(prompt_ids)}


def unpair(pair: dict) -> list[dict]:
    """The two unpaired rows ``{"prompt_ids", "completion_ids", "label"}`` of an encoded pair: chosen is desirable,
    rejected undesirable."""
    prompt_ids = pair["prompt_ids"]
    return [{"prompt_ids": prompt_ids, "completion_ids": pair[f"{side}_input_ids"][len(prompt_ids):], "label": label}
            for side, label in (("chosen", True), ("rejected", False))]


def mismatched_rows(prompts: Sequence[Sequence[int]]) -> list[int]:
    """For each row i, the row whose completion KTO's KL estimate pairs with prompt i: the nearest earlier row
    (cyclically) with a different prompt. TRL shifts completions by one; skipping equal prompts keeps the two rows of
    one unpaired pair from making a matched (prompt, completion). Rows whose batch has a single prompt are paired
    with the previous row, matched: with one prompt there is no mismatch to estimate KL from."""
    size = len(prompts)
    return [next((j for j in ((i - k) % size for k in range(1, size)) if prompts[j] != prompts[i]), (i - 1) % size)
            for i in range(size)]


def serves_unpaired(datamodule) -> Optional[bool]:
    """Whether a preference DataModule serves unpaired rows (KTO's): its ``unpaired`` argument, or for
    ``HFDataModule`` the format of its training rows once checked; None when it cannot say."""
    unpaired = getattr(datamodule, "unpaired", None)
    return unpaired if unpaired is not None else getattr(datamodule, "hparams", {}).get("unpaired")


def collate_unpaired(examples: list[dict], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Batch unpaired rows ``{"prompt_ids", "completion_ids", "label"}`` for KTO.

    ``kl`` rows are each prompt followed by the completion of :func:`mismatched_rows`, the prompt cut from the left to
    fit ``max_length``; TRL's KTO collator builds them the same way, within the batch. Both sides are padded to one
    length T, so a module can score them in one (2B, T) forward.

    Returns:
        ``{completion,kl}_{input_ids,attention_mask,labels}``: (B, T) right-padded, labels -100 on prompt and padding;
        ``label``: (B,) bool, True for a desirable completion.
    """
    prompts = [example["prompt_ids"] for example in examples]
    completions = [example["completion_ids"] for example in examples]
    sides = {"completion": [join(prompt, completion) for prompt, completion in zip(prompts, completions)],
             "kl": [join(fit_prompt(prompts[i], len(completions[j]), max_length), completions[j])
                    for i, j in enumerate(mismatched_rows(prompts))]}
    length = max(len(row["input_ids"]) for rows in sides.values() for row in rows)
    batch = {}
    for side, rows in sides.items():
        batch[f"{side}_input_ids"] = pad_right([row["input_ids"] for row in rows], pad_token_id, length)  # (B, T)
        batch[f"{side}_attention_mask"] = pad_right([[1] * len(row["input_ids"]) for row in rows], 0, length)
        batch[f"{side}_labels"] = pad_right([row["labels"] for row in rows], IGNORE_INDEX, length)
    batch["label"] = torch.tensor([bool(example["label"]) for example in examples])  # (B,)
    return batch


class SQuADPreferenceDataModule(SQuADDataModule):
    """Pairs (prompt, gold answer, corrupted answer) from SQuAD-style QA; validation pairs from the validation split.

    Sources, prompt and completion formatting are those of :class:`~lit_distill.data.squad.SQuADDataModule`.
    Each example's corruption is drawn from ``random.Random(f"{seed}:{id}")``: the same ``seed`` and examples
    give the same pairs, in any order of the examples.

    Batches: ``{chosen,rejected}_{input_ids,attention_mask,labels}`` (B, T) right-padded to one length (labels
    -100 on prompt and padding) and ``margin`` (B,) zeros; with ``unpaired`` those of :func:`collate_unpaired`, each
    pair giving a desirable and an undesirable row.
    """

    def __init__(self, source: str = "embedded", tokenizer: str = "lit-distill/tokenizer",
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, chat_template: str = "none",
                 system: Optional[str] = None, max_length: int = 256, truncation: Truncation = "left_prompt",
                 corruptions: Sequence[str] = ("wrong_span", "other_question", "truncated", "shuffled"),
                 corruption_weights: Optional[Sequence[float]] = None, batch_size: int = 8,
                 eval_batch_size: Optional[int] = None, hub_name: str = "squad", validation_fraction: float = 0.05,
                 embedded_examples: int = 2000, max_examples: Optional[dict[str, int]] = None,
                 max_truncated_fraction: float = 0.5, unpaired: bool = False, num_workers: int = 0, seed: int = 0):
        """
        Args:
            corruptions: names from :data:`CORRUPTIONS`: ``wrong_span`` (another value from the context),
                ``other_question`` (another example's answer), ``truncated`` (first half of the answer),
                ``shuffled`` (words or characters reordered).
            corruption_weights: relative frequency of each corruption (default: equal).
            unpaired: serve unpaired rows (KTO) instead of pairs: gold answer desirable, corruption undesirable.

        The other arguments are those of :class:`~lit_distill.data.squad.SQuADDataModule`; examples no
        corruption applies to are skipped like over-long ones (counted in a warning).
        """
        super().__init__(source, tokenizer, prompt_template, chat_template, system, max_length, truncation,
                         batch_size, eval_batch_size, hub_name, validation_fraction, embedded_examples, max_examples,
                         max_truncated_fraction=max_truncated_fraction, num_workers=num_workers, seed=seed)
        unknown = [name for name in corruptions if name not in CORRUPTIONS]
        if unknown or not corruptions:
            raise ValueError(f"corruptions must be a non-empty list of {sorted(CORRUPTIONS)}, got {list(corruptions)}")
        weights = [1.0] * len(corruptions) if corruption_weights is None else list(corruption_weights)
        if len(weights) != len(corruptions) or any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"corruption_weights must be {len(corruptions)} non-negative numbers, not all 0, "
                             f"got {corruption_weights}")
        self.corruption_weights = weights

    def build_split(self, split: str) -> list[dict]:
        hp = self.hparams
        examples = self.examples(split)

        def encode(example: SQuADExample) -> dict:
            corruption = corrupt(example, examples, random.Random(f"{hp.seed}:{example.id}"), hp.corruptions,
                                 self.corruption_weights)
            if corruption is None:
                raise EncodingError("no corruption applies")
            prompt = self.prompt(example)
            return preference_pair(self.tokenizer, prompt, self.completion(prompt, example.answers[0]),
                                   self.completion(prompt, corruption[1]), hp.max_length, hp.truncation)

        pairs = self.encode_all(split, examples, encode)
        return [row for pair in pairs for row in unpair(pair)] if hp.unpaired else pairs

    def collate_fn(self, split: str) -> Callable[[list[dict]], dict]:
        if self.hparams.unpaired:
            return partial(collate_unpaired, pad_token_id=self.tokenizer.pad_token_id,
                           max_length=self.hparams.max_length)
        return partial(collate_preference, pad_token_id=self.tokenizer.pad_token_id)


PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def read_preference_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line_number, row)`` for every pair of a JSONL file of ``{"prompt", "chosen", "rejected", "margin"?}``.

    Raises:
        DataFileError: ``file:line`` of a malformed line, a missing or non-string field, or a non-numeric margin.
    """
    rows = read_numbered_jsonl(path, required=PREFERENCE_FIELDS, strings=PREFERENCE_FIELDS)
    for number, row in rows:
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DataFileError(f"{path}:{number}: field 'margin' must be a number, got {type(margin).__name__}")
    return rows


UNPAIRED_FIELDS = ("prompt", "completion", "label")


def read_unpaired_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line_number, row)`` for every row of a JSONL file of ``{"prompt", "completion", "label"}`` (TRL's unpaired
    preference format; ``label`` true for a desirable completion).

    Raises:
        DataFileError: ``file:line`` of a malformed line, a missing or non-string field, or a non-boolean label.
    """
    rows = read_numbered_jsonl(path, required=UNPAIRED_FIELDS, strings=UNPAIRED_FIELDS[:2])
    for number, row in rows:
        if not isinstance(row["label"], bool):
            raise DataFileError(f"{path}:{number}: field 'label' must be true or false, got {row['label']!r}")
    return rows


class JSONLPreferenceDataModule(EncodedDataModule):
    """Preference pairs from JSON lines ``{"prompt", "chosen", "rejected", "margin"?}``.

    ``source`` is one ``.jsonl`` file (split into train/validation by ``validation_fraction``) or a directory
    with ``train.jsonl`` and ``validation.jsonl`` (``test.jsonl`` optional). The prompt goes through
    :func:`~lit_distill.data.chat.format_prompt`; ``chosen`` and ``rejected`` are used verbatim (include the
    leading space a base model expects after the prompt).

    A pair whose ``chosen`` equals its ``rejected``, or that does not fit ``max_length`` even with the prompt
    truncated, is invalid: ``on_invalid="error"`` raises a ``DataFileError`` naming file and line,
    ``"skip"`` leaves it out and logs one warning with the count and the first line numbers.

    Batches: ``{chosen,rejected}_{input_ids,attention_mask,labels}`` (B, T) right-padded to one length (labels
    -100 on prompt and padding) and ``margin`` (B,) float, 0 where a line has none.

    With ``unpaired``, lines are ``{"prompt", "completion", "label": bool}`` (one completion, desirable or not, for
    KTO) and batches those of :func:`collate_unpaired`; a completion that does not fit is invalid as above.
    """

    def __init__(self, source: str, tokenizer: str = "lit-distill/tokenizer", chat_template: str = "none",
                 system: Optional[str] = None, max_length: int = 256, truncation: Truncation = "left_prompt",
                 on_invalid: Literal["error", "skip"] = "skip", unpaired: bool = False, batch_size: int = 8,
                 eval_batch_size: Optional[int] = None, validation_fraction: float = 0.05,
                 max_examples: Optional[dict[str, int]] = None, max_truncated_fraction: float = 0.5,
                 num_workers: int = 0, seed: int = 0):
        """
        Args:
            chat_template: ``"none"`` (prompts used as written), ``"default"`` or a Jinja file.
            system: system message for chat templates.
            max_length: longest prompt + completion in tokens.
            truncation: ``"left_prompt"`` cuts over-long prompts from the left; ``"error"`` makes every over-long
                pair invalid.
            on_invalid: ``"skip"`` (counted and logged) or ``"error"``.
            unpaired: read ``{"prompt", "completion", "label"}`` rows (KTO) instead of pairs.
            max_examples: optional cap per split on the lines read, e.g. ``{"validation": 64}``.
            max_truncated_fraction: share of a split's pairs whose prompt may be cut to fit (counted in a warning);
                more is an error.
        """
        super().__init__()
        self.save_hyperparameters()
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"on_invalid must be 'error' or 'skip', got '{on_invalid}'")
        self.tokenizer = load_tokenizer(tokenizer)

    def rows(self, split: str) -> tuple[Optional[Path], list[tuple[int, dict]]]:
        """The file ``split`` is read from (None when absent) and its ``(line_number, row)`` pairs."""
        hp = self.hparams
        path = Path(hp.source).expanduser()
        read = read_unpaired_jsonl if hp.unpaired else read_preference_jsonl
        if path.is_dir():
            split_file = find_split_file(path, split)
            if split_file is None:
                if split == "test":
                    return None, []
                raise FileNotFoundError(f"preference directory '{path}' has no {split}.jsonl")
            return split_file, read(split_file)
        return path, holdout(read(path), split, hp.validation_fraction)

    def check_rows(self, task: Optional[str] = None) -> None:
        for split in ("train", "validation"):
            self.rows(split)

    def build_split(self, split: str) -> list[dict]:
        hp = self.hparams
        path, rows = self.rows(split)
        rows = rows[:(hp.max_examples or {}).get(split)]
        skips = SkipLog(f"{split} split of '{path}'")
        encoded, truncated = [], 0
        for number, row in rows:
            try:
                prompt = format_prompt(self.tokenizer, row["prompt"], hp.chat_template, hp.system)
                if hp.unpaired:
                    encoded.append(self.unpaired_row(prompt, row["completion"], row["label"]))
                    truncated += encoded[-1].pop("truncated")
                    continue
                if row["chosen"] == row["rejected"]:
                    raise EncodingError("chosen == rejected")
                pair = preference_pair(self.tokenizer, prompt, row["chosen"], row["rejected"], hp.max_length,
                                       hp.truncation)
                truncated += pair.pop("truncated")
            except EncodingError as err:
                if hp.on_invalid == "error":
                    raise DataFileError(f"{path}:{number}: {err} (on_invalid='error')") from None
                skips.add(f"line {number}", str(err))
                continue
            encoded.append({**pair, "margin": float(row.get("margin", 0.0))})
        skips.report(len(rows))
        self.report_truncation(f"{split} split of '{path}'", truncated, len(encoded), hp.max_length)
        if split != "test" and not encoded:
            raise ValueError(f"{split} split of '{path}' has no valid preference rows ({len(rows)} lines read, "
                             f"{len(skips.where)} skipped)")
        return encoded

    def unpaired_row(self, prompt: str, completion: str, label: bool) -> dict:
        prompt_ids = tokenize(self.tokenizer, prompt)
        completion_ids = tokenize_completion(self.tokenizer, completion)
        fitted = fit_prompt(prompt_ids, len(completion_ids), self.hparams.max_length, self.hparams.truncation)
        return {"prompt_ids": fitted, "completion_ids": completion_ids, "label": label,
                "truncated": len(fitted) < len(prompt_ids)}

    def collate_fn(self, split: str) -> Callable[[list[dict]], dict]:
        if self.hparams.unpaired:
            return partial(collate_unpaired, pad_token_id=self.tokenizer.pad_token_id,
                           max_length=self.hparams.max_length)
        return partial(collate_preference, pad_token_id=self.tokenizer.pad_token_id)
