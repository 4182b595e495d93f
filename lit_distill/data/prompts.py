"""Prompts for online RL (PPO, GRPO): the text a policy continues and the columns its reward functions need.

A JSONL line is either

  * ``{"text": ...}``: raw text to continue, used as written (never chat-formatted), or
  * ``{"prompt": ...}``: a user turn, formatted by ``chat_template`` (see :func:`~lit_distill.data.chat.format_prompt`),

plus any extra columns (``answer``, ``reference``, ``id``...; any JSON value), handed to reward functions by name.
Every line of a file must carry the same extra columns: a reward that needs ``answer`` needs it on every row, so
a missing one is an error naming the line, not a silent ``None``. ``text`` and ``prompt`` lines may be mixed.

Shapes: B batch, P prompt length.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Optional

from lit_distill.data import corpus
from lit_distill.data.base import SPLITS, EncodedDataModule
from lit_distill.data.chat import format_prompt
from lit_distill.data.collate import Truncation, holdout, tokenize
from lit_distill.data.io import JSONL_SUFFIXES, DataFileError, find_split_file, read_numbered_jsonl
from lit_distill.data.squad import DEFAULT_PROMPT_TEMPLATE
from lit_distill.models.loading import load_tokenizer
from lit_distill.rollout.sampling import left_pad

EMBEDDED = ("arithmetic", "arithmetic_statements", "qa", "text")
SOURCE_FIELDS = ("text", "prompt")
# Keys the encoded examples and batches use themselves; a column of that name would be overwritten.
RESERVED_COLUMNS = ("prompt_ids", "prompt_input_ids", "prompt_attention_mask")

Row = tuple[str, dict]  # (where: "file:line" or an embedded id, {"text" | "prompt": str, **columns})


def read_prompt_jsonl(path: str | Path) -> list[Row]:
    """Read and check a prompt JSONL file (see the module docstring for the line format).

    Returns:
        ``("file:line", row)`` for every non-blank line.

    Raises:
        DataFileError: naming ``file:line``: malformed JSON, both or neither of ``text``/``prompt``, one that is
            not a non-empty string, a reserved column name, or columns other than those of the first line.
    """
    rows, first = [], None
    for number, row in read_numbered_jsonl(path):
        where = f"{path}:{number}"
        present = [name for name in SOURCE_FIELDS if name in row]
        if len(present) != 1:
            raise DataFileError(f"{where}: expected exactly one of 'text' (raw text to continue) or 'prompt' (a user "
                                f"turn); the line has {sorted(row)}")
        value = row[present[0]]
        if not isinstance(value, str) or not value:
            raise DataFileError(f"{where}: field '{present[0]}' must be a non-empty string, got {value!r:.40}")
        columns = set(row) - set(present)
        reserved = sorted(columns & set(RESERVED_COLUMNS))
        if reserved:
            raise DataFileError(f"{where}: column name(s) {reserved} are reserved for the batch tensors")
        if first is None:
            first = (number, columns)
        elif columns != first[1]:
            missing, extra = sorted(first[1] - columns), sorted(columns - first[1])
            problem = f"missing column(s) {missing}" if missing else f"column(s) {extra} not on line {first[0]}"
            raise DataFileError(f"{where}: {problem}; every line needs the columns of line {first[0]}, "
                                f"{sorted(first[1])}, since reward functions get one value per row")
        rows.append((where, row))
    return rows


def embedded_rows(kind: str, count: int, seed: int, max_operand: int) -> list[Row]:
    """``count`` rows of an embedded prompt set, all with an ``id`` column (see :class:`JSONLPromptDataModule`)."""
    if kind == "arithmetic":
        rows = [{"prompt": p.prompt, "answer": p.answer, "id": p.id}
                for p in corpus.arithmetic_problems(count, seed, max_operand)]
    elif kind == "arithmetic_statements":
        rows = [{"text": p.prompt, "answer": p.answer, "id": p.id}
                for p in corpus.arithmetic_statements(count, seed, max_operand)]
    elif kind == "qa":
        # SQuADDataModule's prompt: a model fine-tuned there sees the same text here.
        rows = [{"prompt": DEFAULT_PROMPT_TEMPLATE.format(context=e.context, question=e.question), "answer": e.answer,
                 "id": e.id} for e in corpus.qa_examples(count, seed)]
    elif kind == "text":
        rows = []
        for i, document in enumerate(corpus.text_documents(count, seed)):
            # Corpus sentences end in "." and are joined by " " (documents have 3+); text + reference == document.
            end = document.index(". ") + 1
            rows.append({"text": document[:end], "reference": document[end:], "id": f"text-{seed}-{i}"})
    else:
        raise ValueError(f"embedded must be one of {EMBEDDED}, got '{kind}'")
    return [(row["id"], row) for row in rows]


def collate_prompts(examples: list[dict], pad_token_id: int) -> dict:
    """Batch encoded prompts (``prompt_ids``, ``prompt`` and the columns) for generation.

    Returns:
        ``prompt_input_ids``, ``prompt_attention_mask``: (B, P) left-padded with ``pad_token_id``; ``prompt``: the
        B prompt texts; every column as a list of B values under its own name.
    """
    input_ids, attention_mask = left_pad([example["prompt_ids"] for example in examples], pad_token_id)  # (B, P)
    batch = {"prompt_input_ids": input_ids, "prompt_attention_mask": attention_mask}
    for key in examples[0]:
        if key != "prompt_ids":
            batch[key] = [example[key] for example in examples]
    return batch


class JSONLPromptDataModule(EncodedDataModule):
    """Prompts (and reward columns) for online RL, from JSONL files or an embedded generator.

    Exactly one source:
      * ``path``: a ``.jsonl`` file (the first ``validation_fraction`` of its lines is validation, the rest
        train, independently of ``seed``, so runs with different seeds validate on the same prompts; no test),
        or a directory with ``train.jsonl`` and ``validation.jsonl`` (``test.jsonl`` optional);
      * ``embedded``: generated offline, ``num_embedded`` training rows and a tenth of that for validation and
        test, from seeds ``seed``, ``seed + 1``, ``seed + 2`` (as :class:`~lit_distill.data.squad.SQuADDataModule`):

        - ``"arithmetic"``: ``{"prompt": "What is 3 plus 4?", "answer": "7", "id"}`` (a user turn);
        - ``"arithmetic_statements"``: ``{"text": "7 plus 5 is", "answer": "12", "id"}``, the digit-style sums
          of the corpus documents cut before the result;
        - ``"qa"``: ``{"prompt", "answer", "id"}``, the embedded SQuAD-shaped questions with SQuADDataModule's
          prompt (identical text under the same ``chat_template`` and system prompt);
        - ``"text"``: ``{"text", "reference", "id"}``, the first sentence of a corpus document and the rest of it
          (``text + reference`` is the document), for similarity or likelihood rewards.

      Arithmetic splits are distinct samples, not distinct problems: at ``max_operand=10`` there are only
      363 (a, op, b) sums, so validation prompts also occur in training.

    A prompt longer than ``max_prompt_length`` tokens keeps its last tokens (next to the generation; the count
    is logged once per split) or, with ``truncation="error"``, raises naming its file and line.

    Batches: ``prompt_input_ids``, ``prompt_attention_mask`` (B, P) left-padded with the pad id; ``prompt``
    (list[str]) the text the model sees (chat template applied; after truncation, the kept tokens decoded); each
    column (``answer``, ``reference``, ``id``...) as a list under its own name.
    """

    def __init__(self, path: Optional[str] = None, embedded: Optional[str] = None,
                 tokenizer: str = "lit-distill/tokenizer", num_embedded: int = 2000, max_operand: int = 10,
                 chat_template: str = "none", system_prompt: Optional[str] = None, max_prompt_length: int = 256,
                 truncation: Truncation = "left_prompt", validation_fraction: float = 0.05,
                 max_examples: Optional[dict[str, int]] = None, max_truncated_fraction: float = 0.5,
                 batch_size: int = 8, eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0):
        """
        Args:
            path: a ``.jsonl`` file or a directory of split files (exclusive with ``embedded``).
            embedded: one of ``"arithmetic"``, ``"arithmetic_statements"``, ``"qa"``, ``"text"``.
            tokenizer: tokenizer name or path, loaded with ``load_tokenizer``.
            num_embedded: training rows generated for ``embedded`` (validation and test get a tenth each).
            max_operand: largest operand of the arithmetic kinds (the corpus documents use at most 10).
            chat_template: for ``prompt`` rows: ``"none"`` (as written, like SQuADDataModule's default),
                ``"default"`` or a Jinja file (see :func:`~lit_distill.data.chat.format_prompt`). ``text`` rows
                are never formatted.
            system_prompt: system message for chat templates.
            max_prompt_length: longest prompt in tokens.
            truncation: ``"left_prompt"`` keeps the last ``max_prompt_length`` tokens of a longer prompt;
                ``"error"`` raises instead.
            validation_fraction: share of a single file's lines used for validation.
            max_examples: optional cap per split on the rows read, e.g. ``{"validation": 64}``.
            max_truncated_fraction: share of a split's prompts that may be truncated (counted in a warning); more is
                an error.
        """
        super().__init__()
        self.save_hyperparameters()
        if (path is None) == (embedded is None):
            raise ValueError(f"give exactly one of path (a .jsonl file or directory) or embedded (one of "
                             f"{EMBEDDED}); got path={path!r}, embedded={embedded!r}")
        if embedded is not None and embedded not in EMBEDDED:
            raise ValueError(f"embedded must be one of {EMBEDDED}, got '{embedded}'")
        if truncation not in ("left_prompt", "error"):
            raise ValueError(f"truncation must be 'left_prompt' or 'error', got '{truncation}'")
        if max_prompt_length < 1 or num_embedded < 1:
            raise ValueError(f"max_prompt_length and num_embedded must be >= 1, got {max_prompt_length} and "
                             f"{num_embedded}")
        self.tokenizer = load_tokenizer(tokenizer)

    def rows(self, split: str) -> tuple[str, list[Row]]:
        """A description of where ``split`` comes from and its ``(where, row)`` pairs, capped by ``max_examples``."""
        hp = self.hparams
        cap = (hp.max_examples or {}).get(split)
        if hp.embedded is not None:
            count = hp.num_embedded if split == "train" else max(1, hp.num_embedded // 10)
            return f"embedded '{hp.embedded}'", embedded_rows(hp.embedded, count, hp.seed + SPLITS.index(split),
                                                              hp.max_operand)[:cap]
        return self.file_rows(split)

    def check_rows(self, task: Optional[str] = None) -> None:
        for split in ("train", "validation"):
            self.rows(split)

    def read_file(self, path: Path) -> list[Row]:
        """The checked rows of one JSONL file (subclasses read other line formats)."""
        return read_prompt_jsonl(_jsonl(path))

    def file_rows(self, split: str) -> tuple[str, list[Row]]:
        """``split`` of ``path``: its file in a split directory, or its share of a single file."""
        hp = self.hparams
        cap = (hp.max_examples or {}).get(split)
        path = Path(hp.path).expanduser()
        if path.is_dir():
            split_file = find_split_file(path, split)
            if split_file is None:
                if split == "test":
                    return f"'{path}'", []
                raise FileNotFoundError(f"directory '{path}' has no {split}.jsonl")
            return f"'{split_file}'", self.read_file(split_file)[:cap]
        return f"'{path}'", holdout(self.read_file(path), split, hp.validation_fraction)[:cap]

    def build_split(self, split: str) -> list[dict]:
        hp = self.hparams
        origin, rows = self.rows(split)
        encoded, truncated = [], []
        for where, row in rows:
            columns = {name: value for name, value in row.items() if name not in SOURCE_FIELDS}
            text = row["text"] if "text" in row else format_prompt(self.tokenizer, row["prompt"], hp.chat_template,
                                                                   hp.system_prompt)
            ids = tokenize(self.tokenizer, text)
            if len(ids) > hp.max_prompt_length:
                if hp.truncation == "error":
                    raise ValueError(f"{where}: the prompt has {len(ids)} tokens, more than max_prompt_length="
                                     f"{hp.max_prompt_length} (truncation='error')")
                # The end of the prompt (the question, the assistant header) is what the generation continues.
                ids = ids[-hp.max_prompt_length:]
                text = self.tokenizer.decode(ids)
                truncated.append(where)
            encoded.append({"prompt_ids": ids, "prompt": text, **columns})
        self.report_truncation(f"{split} split of {origin} (their last tokens kept; first: "
                               f"{', '.join(truncated[:5])})", len(truncated), len(rows), hp.max_prompt_length)
        if split != "test" and not encoded:
            raise ValueError(f"{split} split of {origin} has no prompts")
        return encoded

    def collate_fn(self, split: str) -> Callable[[list[dict]], dict]:
        return partial(collate_prompts, pad_token_id=self.tokenizer.pad_token_id)


def _jsonl(path: Path) -> Path:
    if path.exists() and path.suffix not in JSONL_SUFFIXES:
        raise DataFileError(f"{path}: prompt files are JSON lines; expected one of {JSONL_SUFFIXES}, "
                            f"got '{path.suffix}'")
    return path
