"""Questions for the teacher↔student loop: JSONL question files, SQuAD, or the embedded generators.

Every example is a prompt row of :class:`~lit_distill.data.prompts.JSONLPromptDataModule` with a ``question``
column — the text both models are asked (context included), before the student's chat template — and, when
known, the gold ``answer`` (a string or a list of acceptable strings).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal, Optional

from lit_distill.data.base import SPLITS
from lit_distill.data.collate import Truncation
from lit_distill.data.io import DataFileError, read_numbered_jsonl
from lit_distill.data.prompts import JSONLPromptDataModule, Row, _jsonl, embedded_rows
from lit_distill.data.squad import DEFAULT_PROMPT_TEMPLATE, SQuADDataModule

log = logging.getLogger(__name__)

EMBEDDED_QUESTIONS = ("qa", "arithmetic", "arithmetic_statements")
FORMATS = ("questions", "squad")


def read_question_jsonl(path: str | Path, prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> list[Row]:
    """Rows of a question file: lines ``{"question": str, "answer"?: str | list[str], "context"?: str, "id"?}``.

    A line with a ``context`` is asked as ``prompt_template`` filled with it; ``answer`` (and ``id``) must be on
    every line or on none, since metrics need one value per question.

    Raises:
        DataFileError: naming ``file:line``: malformed JSON, a missing or non-string ``question``, a non-string
            ``context``, an ``answer`` that is not a string or list of strings, or ``answer``/``id`` on some lines
            only.
    """
    rows, first = [], None
    for number, line in read_numbered_jsonl(path, required=("question",), strings=("question",)):
        where = f"{path}:{number}"
        context = line.get("context")
        if context is not None and not isinstance(context, str):
            raise DataFileError(f"{where}: field 'context' must be a string, got {type(context).__name__}")
        answer = line.get("answer")
        if answer is not None and not (isinstance(answer, str) or (
                isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer))):
            raise DataFileError(f"{where}: field 'answer' must be a string or a non-empty list of strings")
        optional = {name for name in ("answer", "id") if name in line}
        if first is None:
            first = (number, optional)
        elif optional != first[1]:
            raise DataFileError(f"{where}: has {sorted(optional)} of the optional fields ['answer', 'id'] but line "
                                f"{first[0]} has {sorted(first[1])}; give them on every line or on none")
        text = prompt_template.format(context=context, question=line["question"]) if context else line["question"]
        rows.append((where, {"prompt": text, "question": text, **{name: line[name] for name in optional}}))
    return rows


def normalise_question(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def deduplicate(rows: list[Row]) -> list[Row]:
    """The rows whose question (case and whitespace ignored) has not been seen before, in order."""
    seen, kept = set(), []
    for where, row in rows:
        key = normalise_question(row["question"])
        if key not in seen:
            seen.add(key)
            kept.append((where, row))
    if len(kept) < len(rows):
        log.warning("dropped %d duplicate question(s) of %d", len(rows) - len(kept), len(rows))
    return kept


class QuestionDataModule(JSONLPromptDataModule):
    """Questions asked to a teacher and a student (see the module docstring for the batch columns).

    Exactly one source:
      * ``path`` with ``format="questions"``: a JSONL file of questions (split by ``validation_fraction``) or a
        directory with ``train.jsonl`` / ``validation.jsonl`` (see :func:`read_question_jsonl`) — e.g. the output
        of ``python -m lit_distill generate-questions``;
      * ``path`` with ``format="squad"``: anything ``SQuADDataModule(source=...)`` reads: ``"hub"`` (``squad``),
        an official SQuAD JSON file or a directory of them; the prompt is ``prompt_template`` with the context;
      * ``embedded``: ``"qa"`` (the embedded SQuAD-shaped questions), ``"arithmetic"`` ("What is 3 plus 4?") or
        ``"arithmetic_statements"`` ("3 plus 4 is", raw text in the style of the corpus the shipped tiny teacher
        learnt: the embedded questions that teacher can answer).

    Duplicate questions (case and whitespace ignored) are dropped within a split, with a logged count.
    Other arguments as :class:`~lit_distill.data.prompts.JSONLPromptDataModule`.
    """

    def __init__(self, path: Optional[str] = None, embedded: Optional[str] = None,
                 format: Literal["questions", "squad"] = "questions", tokenizer: str = "lit-distill/tokenizer",
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, num_embedded: int = 2000, max_operand: int = 10,
                 chat_template: str = "none", system_prompt: Optional[str] = None, max_prompt_length: int = 256,
                 truncation: Truncation = "left_prompt", validation_fraction: float = 0.05,
                 max_examples: Optional[dict[str, int]] = None, max_truncated_fraction: float = 0.5,
                 batch_size: int = 8, eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0):
        if embedded is not None and embedded not in EMBEDDED_QUESTIONS:
            raise ValueError(f"embedded questions must be one of {EMBEDDED_QUESTIONS}, got '{embedded}'")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got '{format}'")
        super().__init__(path=path, embedded=embedded, tokenizer=tokenizer, num_embedded=num_embedded,
                         max_operand=max_operand, chat_template=chat_template, system_prompt=system_prompt,
                         max_prompt_length=max_prompt_length, truncation=truncation,
                         validation_fraction=validation_fraction, max_examples=max_examples,
                         max_truncated_fraction=max_truncated_fraction, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()

    def rows(self, split: str) -> tuple[str, list[Row]]:
        hp = self.hparams
        cap = (hp.max_examples or {}).get(split)
        if hp.embedded is not None:
            count = hp.num_embedded if split == "train" else max(1, hp.num_embedded // 10)
            rows = [(where, {**row, "question": row.get("prompt", row.get("text"))})
                    for where, row in embedded_rows(hp.embedded, count, hp.seed + SPLITS.index(split),
                                                    hp.max_operand)]
            return f"embedded '{hp.embedded}'", deduplicate(rows)[:cap]
        if hp.format == "squad":
            squad = SQuADDataModule(source=hp.path, tokenizer=hp.tokenizer, validation_fraction=hp.validation_fraction,
                                    seed=hp.seed)
            rows = []
            for example in squad.examples(split):
                text = hp.prompt_template.format(context=example.context, question=example.question)
                rows.append((example.id, {"prompt": text, "question": text, "answer": list(example.answers),
                                          "id": example.id}))
            return f"SQuAD '{hp.path}'", deduplicate(rows)[:cap]
        return self.file_rows(split)

    def read_file(self, path: Path) -> list[Row]:
        return deduplicate(read_question_jsonl(_jsonl(path), self.hparams.prompt_template))
