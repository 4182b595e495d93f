"""Extractive QA as supervised fine-tuning: (context, question) -> answer, from SQuAD or the embedded corpus."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from lit_distill.data import corpus
from lit_distill.data.base import SPLITS, EncodedDataModule
from lit_distill.data.chat import format_prompt
from lit_distill.data.collate import (EncodingError, SkipLog, TooLongError, Truncation, collate_sft,
                                      encode_pair_ids, holdout, tokenize, tokenize_completion)
from lit_distill.data.io import DataFileError, read_utf8
from lit_distill.data.packing import PackedDataset, best_fit_decreasing, collate_packed, packing_summary
from lit_distill.models.loading import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
# File names of a split in a SQuAD directory: ours, then the official releases' (v1.1 and v2.0).
SPLIT_FILES = {"train": ("train.json", "train-v1.1.json", "train-v2.0.json"),
               "validation": ("validation.json", "dev.json", "dev-v1.1.json", "dev-v2.0.json"),
               "test": ("test.json",)}


@dataclass(frozen=True)
class SQuADExample:
    """One answerable question; ``answers[0]`` is the training target, all of them count for EM/F1."""

    id: str
    context: str
    question: str
    answers: tuple[str, ...]


def read_squad_json(path: str | Path) -> list[SQuADExample]:
    """Answerable questions of an official SQuAD v1.1/v2.0 JSON file.

    The shape is ``{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
    "answer_start"}], "is_impossible"?}]}]}]}``. SQuAD v2 questions marked ``is_impossible`` are skipped (the
    count is logged).

    Raises:
        DataFileError: malformed JSON, or an element without a required field; the message names the file and
            the JSON path of the element, e.g. ``data[3].paragraphs[0].qas[2]: missing 'answers'``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file '{path}' does not exist")
    try:
        document = json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None

    def get(element: Any, key: str, kind: type, where: str) -> Any:
        if not isinstance(element, dict):
            raise DataFileError(f"{path}: {where}: expected a JSON object, got {type(element).__name__}")
        if key not in element:
            raise DataFileError(f"{path}: {where}: missing '{key}'; it has {sorted(element)}")
        if not isinstance(element[key], kind):
            raise DataFileError(f"{path}: {where}.{key}: expected {kind.__name__}, got {type(element[key]).__name__}")
        return element[key]

    examples, num_impossible = [], 0
    for a, article in enumerate(get(document, "data", list, "top level")):
        for p, paragraph in enumerate(get(article, "paragraphs", list, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = get(paragraph, "context", str, where)
            for q, qa in enumerate(get(paragraph, "qas", list, where)):
                where_qa = f"{where}.qas[{q}]"
                qid, question = get(qa, "id", str, where_qa), get(qa, "question", str, where_qa)
                if qa.get("is_impossible", False):
                    num_impossible += 1
                    continue
                answers = [get(answer, "text", str, f"{where_qa}.answers[{i}]")
                           for i, answer in enumerate(get(qa, "answers", list, where_qa))]
                if not answers:
                    raise DataFileError(f"{path}: {where_qa}: 'answers' is empty but the question is not marked "
                                        f"'is_impossible'")
                examples.append(SQuADExample(qid, context, question, tuple(answers)))
    if num_impossible:
        log.info("%s: skipped %d unanswerable (SQuAD v2 is_impossible) questions", path, num_impossible)
    return examples


class SQuADDataModule(EncodedDataModule):
    """SQuAD-style extractive QA for SFT: the prompt is the filled ``prompt_template``, the completion the answer.

    ``source`` picks where examples come from:
      * ``"embedded"``: :func:`lit_distill.data.corpus.qa_examples` (offline; splits use seeds seed, seed+1, seed+2);
      * ``"hub"``: ``datasets.load_dataset(hub_name)`` splits train and validation (no test);
      * a directory with ``train.json`` and ``validation.json`` or ``dev.json`` (official names such as
        ``dev-v1.1.json`` work too; ``test.json`` optional), in the official SQuAD JSON shape;
      * one such file: split into train/validation by ``validation_fraction``.

    The completion is ``" " + answer`` (no space when the prompt already ends in whitespace, e.g. after a chat
    template's newline): after ``"Answer:"`` the word appears as it would in running text, so its BPE tokens
    (``"ĠParis"``) are those the model would generate. EOS is appended; the loss covers the answer and EOS only.

    Batches: ``input_ids``, ``attention_mask``, ``labels`` (B, T) right-padded. Validation and test batches
    also carry ``prompt_input_ids``, ``prompt_attention_mask`` (B, P) left-padded for generation, ``ids``
    (list[str]) and ``answers`` (list[list[str]], every gold answer) for EM/F1.
    """

    def __init__(self, source: str = "embedded", tokenizer: str = "lit-distill/tokenizer",
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, chat_template: str = "none",
                 system: Optional[str] = None, max_length: int = 256, truncation: Truncation = "left_prompt",
                 batch_size: int = 8, eval_batch_size: Optional[int] = None, hub_name: str = "squad",
                 validation_fraction: float = 0.05, embedded_examples: int = 2000,
                 max_examples: Optional[dict[str, int]] = None, packing: bool = False,
                 max_truncated_fraction: float = 0.5, num_workers: int = 0, seed: int = 0):
        """
        Args:
            tokenizer: tokenizer name or path, loaded with ``load_tokenizer``.
            prompt_template: Python format string with the fields ``{context}`` and ``{question}``.
            chat_template: ``"none"``, ``"default"`` or a Jinja file (see :func:`~lit_distill.data.chat.format_prompt`).
            system: system message for chat templates.
            max_length: longest prompt + completion in tokens.
            truncation: ``"left_prompt"`` cuts over-long prompts from the left (an example whose answer alone
                does not fit is skipped, and the skips are counted in a warning); ``"error"`` raises instead.
            embedded_examples: training examples generated for ``source="embedded"`` (validation and test get
                a tenth each).
            max_examples: optional cap per split, e.g. ``{"validation": 64}``, for quick runs.
            packing: pack the training examples into rows of up to ``max_length`` tokens by best-fit decreasing
                (``data.packing``): batches then also carry ``position_ids``, and no padding between examples is
                computed. Evaluation stays unpacked (its prompts are generated from row by row).
            max_truncated_fraction: share of a split's examples whose prompt may be cut to fit (counted in a
                warning); more is an error.
        """
        super().__init__()
        self.save_hyperparameters()
        try:
            prompt_template.format(context="", question="")
        except (KeyError, IndexError) as err:
            raise ValueError(f"prompt_template may only use the fields {{context}} and {{question}}, "
                             f"got {prompt_template!r}") from err
        self.tokenizer = load_tokenizer(tokenizer)

    def examples(self, split: str) -> list[SQuADExample]:
        """The answerable questions of ``split``, capped by ``max_examples``."""
        hp = self.hparams
        cap = (hp.max_examples or {}).get(split)
        return self._read(split)[:cap]

    def _read(self, split: str) -> list[SQuADExample]:
        hp = self.hparams
        if hp.source == "embedded":
            count = hp.embedded_examples if split == "train" else max(1, hp.embedded_examples // 10)
            return [SQuADExample(e.id, e.context, e.question, (e.answer,))
                    for e in corpus.qa_examples(count, seed=hp.seed + SPLITS.index(split))]
        if hp.source == "hub":
            if split == "test":
                return []
            import datasets

            rows = datasets.load_dataset(hp.hub_name, split=split)
            # squad_v2 marks unanswerable questions by an empty answer list.
            return [SQuADExample(row["id"], row["context"], row["question"], tuple(row["answers"]["text"]))
                    for row in rows if row["answers"]["text"]]
        path = Path(hp.source).expanduser()
        if path.is_dir():
            split_file = next((path / name for name in SPLIT_FILES[split] if (path / name).is_file()), None)
            if split_file is None:
                if split == "test":
                    return []
                raise FileNotFoundError(f"SQuAD directory '{path}' has none of {SPLIT_FILES[split]}")
            return read_squad_json(split_file)
        return holdout(read_squad_json(path), split, hp.validation_fraction)

    def prompt(self, example: SQuADExample) -> str:
        hp = self.hparams
        text = hp.prompt_template.format(context=example.context, question=example.question)
        return format_prompt(self.tokenizer, text, hp.chat_template, hp.system)

    @staticmethod
    def completion(prompt: str, answer: str) -> str:
        """The answer as it continues ``prompt`` (a leading space unless the prompt ends in whitespace)."""
        answer = answer.strip()
        return answer if prompt[-1:].isspace() else " " + answer

    def encode_all(self, split: str, examples: list, encode: Callable[[Any], dict]) -> list[dict]:
        """``encode`` every example; one raising ``EncodingError`` is skipped (counted in one warning), except
        that an over-long one raises with ``truncation="error"``. Examples whose prompt was cut (``encode`` sets
        ``truncated``) are counted, up to ``max_truncated_fraction``. An empty train or validation split raises."""
        origin = f"{split} split of source '{self.hparams.source}'"
        skips = SkipLog(origin)
        encoded, truncated = [], 0
        for example in examples:
            try:
                encoded.append(encode(example))
            except EncodingError as err:
                if isinstance(err, TooLongError) and self.hparams.truncation == "error":
                    raise ValueError(f"example '{example.id}' of the {split} split: {err}") from err
                skips.add(example.id, str(err))
                continue
            truncated += encoded[-1].pop("truncated")
        skips.report(len(examples))
        self.report_truncation(origin, truncated, len(encoded), self.hparams.max_length)
        if split != "test" and not encoded:
            raise ValueError(f"{split} split of source '{self.hparams.source}' is empty ({len(examples)} examples "
                             f"read, {len(skips.where)} skipped)")
        return encoded

    def build_split(self, split: str) -> list[dict]:
        def encode(example: SQuADExample) -> dict:
            prompt = self.prompt(example)
            prompt_ids = tokenize(self.tokenizer, prompt)
            pair = encode_pair_ids(prompt_ids, tokenize_completion(self.tokenizer, self.completion(
                prompt, example.answers[0])), self.hparams.max_length, self.hparams.truncation)
            return {**pair, "id": example.id, "answers": list(example.answers),
                    "truncated": len(pair["prompt_ids"]) < len(prompt_ids)}

        encoded = self.encode_all(split, self.examples(split), encode)
        if split != "train" or not self.hparams.packing:
            return encoded
        lengths = [len(example["input_ids"]) for example in encoded]
        bins = best_fit_decreasing(lengths, self.hparams.max_length)
        log.info(packing_summary(lengths, bins, self.hparams.max_length, self.hparams.batch_size))
        return PackedDataset(encoded, bins)

    def collate_fn(self, split: str) -> Callable[[list[dict]], dict]:
        if split == "train" and self.hparams.packing:
            return partial(collate_packed, pad_token_id=self.tokenizer.pad_token_id)
        if split == "train":
            return partial(collate_sft, pad_token_id=self.tokenizer.pad_token_id)
        return partial(collate_sft, pad_token_id=self.tokenizer.pad_token_id, with_prompts=True,
                       metadata=(("id", "ids"), ("answers", "answers")))
