"""The ecosystem's dataset formats (TRL's "dataset formats"), detected from a dataset's columns, and the encoder
that turns their rows into what each task's batches need.

Format (columns)                            style                         tasks
``text`` {text}                             standard                      sft (language modelling)
``messages`` {messages}                     conversational                sft (language modelling)
``prompt_completion`` {prompt, completion}  standard or conversational    sft
``preference`` {prompt, chosen, rejected}   standard or conversational    preference
``implicit_preference`` {chosen, rejected}  standard or conversational    preference (prompt = common prefix)
``unpaired_preference`` {prompt, completion, label}  standard or conversational  preference, unpaired (KTO)
``prompt_only`` {prompt}                    standard or conversational    prompts (other columns reach rewards)
``questions`` {question}                    standard (prompt? answer?)    questions (the teacher↔student loop)

A value is conversational when it is a list of ``{"role", "content"}`` messages; conversational values go through
the chat template, standard strings are used as written (as TRL does). Extra columns are kept for the prompts and
questions tasks (reward functions and metrics read them by name) and dropped otherwise.

Shapes: lists of token ids per row (the DataModule collates them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from transformers import PreTrainedTokenizerBase

from lit_distill.data.collate import (EncodingError, IGNORE_INDEX, TooLongError, encode_pair_ids,
                                      encode_preference_ids, tokenize)
from lit_distill.data.conversation import (assistant_spans, check_messages, completion_span, is_conversation,
                                           render, tokenize_spans)
from lit_distill.data.io import DataFileError

Task = Literal["sft", "preference", "prompts", "questions"]
Format = Literal["text", "messages", "prompt_completion", "preference", "implicit_preference",
                 "unpaired_preference", "prompt_only", "questions"]
Overlong = Literal["truncate", "skip", "error"]

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"), "implicit_preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",),
    "prompt_only": ("prompt",), "questions": ("question",)}
# Detection order within a task: the first format whose columns are all present wins.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt_completion", "messages", "text"),
    "preference": ("preference", "implicit_preference", "unpaired_preference"),
    "prompts": ("prompt_only",), "questions": ("questions",)}
# What the encoder writes for each task (besides "truncated" and "skipped"), and what a skipped row holds (typed
# like the real values, so that every batch of ``datasets.map`` has one Arrow schema; skipped rows are dropped).
OUTPUT_COLUMNS = {"sft": ("input_ids", "labels"),
                  "preference": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
                                 "margin"),
                  "prompts": ("prompt_ids", "prompt"), "questions": ("prompt_ids", "prompt")}
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")  # the preference task's, for unpaired rows (KTO)
PLACEHOLDERS = {"input_ids": [0], "labels": [0], "chosen_input_ids": [0], "chosen_labels": [0],
                "rejected_input_ids": [0], "rejected_labels": [0], "margin": 0.0, "prompt_ids": [0], "prompt": "",
                "completion_ids": [0], "label": False, "truncated": False}
# Batch keys of the prompts/questions tasks; a data column of that name would be overwritten.
RESERVED_COLUMNS = ("prompt_ids", "prompt_input_ids", "prompt_attention_mask")


def detect_format(columns: list[str], task: str, forced: Optional[str], origin: str) -> str:
    """The format of a dataset with ``columns`` for ``task``: ``forced`` if given (checked), else the first of
    :data:`TASK_FORMATS` whose columns are present.

    Raises:
        ValueError: naming ``origin``, the columns found and the formats ``task`` accepts with their columns.
    """
    if task not in TASK_FORMATS:
        raise ValueError(f"task must be one of {sorted(TASK_FORMATS)}, got '{task}'")
    accepted = TASK_FORMATS[task]
    listing = "; ".join(f"{name} {list(FORMAT_COLUMNS[name])}" for name in accepted)
    if forced is not None:
        if forced not in accepted:
            raise ValueError(f"format '{forced}' does not serve the {task} task; it accepts {listing}")
        missing = [column for column in FORMAT_COLUMNS[forced] if column not in columns]
        if missing:
            raise ValueError(f"{origin}: format '{forced}' needs the column(s) {missing}; the dataset has "
                             f"{sorted(columns)} (rename_columns maps other names)")
        return forced
    for name in accepted:
        if all(column in columns for column in FORMAT_COLUMNS[name]):
            return name
    raise ValueError(f"{origin}: the columns {sorted(columns)} match none of the formats the {task} task accepts: "
                     f"{listing}. Map your column names with rename_columns: {{yours: theirs}}")


def common_prefix(chosen, rejected) -> int:
    """Where an implicit-prompt pair's completions start: for message lists, the first differing message; for
    strings, the last whitespace at or before the first differing character, so that the completions start with
    their leading space and no word is split between prompt and completion (TRL cuts mid-word instead)."""
    length = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if isinstance(chosen, list):
        return length
    return max(chosen.rfind(" ", 0, length + 1), chosen.rfind("\n", 0, length + 1), 0)


@dataclass(frozen=True)
class Encoder:
    """Encodes batches of rows of one format for one task; the function handed to ``datasets.map`` (a frozen
    dataclass, so that ``datasets`` fingerprints it, and the cache, by its fields).

    Every output row has ``skipped`` (why it cannot be used, "" if it can) and ``truncated`` besides the task's
    columns: ``input_ids``/``labels`` (sft), ``{chosen,rejected}_{input_ids,labels}`` and ``margin``
    (preference; ``prompt_ids``, ``completion_ids`` and ``label`` for unpaired rows), ``prompt_ids`` and ``prompt``
    (prompts, questions).
    """

    tokenizer: PreTrainedTokenizerBase
    task: str
    format: str
    template: Optional[str]  # the chat template for conversational values; None: they are an error
    max_length: int
    overlong: Overlong = "truncate"
    assistant_only_loss: bool = True
    completion_only_loss: bool = True
    origin: str = "dataset"  # names the source in error messages
    first_row: int = 0  # the source row of the first row encoded, so that messages name the source's rows

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        outputs = UNPAIRED_COLUMNS if self.format == "unpaired_preference" else OUTPUT_COLUMNS[self.task]
        columns = {key: [] for key in (*outputs, "truncated", "skipped")}
        for index, row in zip(indices, (dict(zip(batch, values)) for values in zip(*batch.values()))):
            where = f"{self.origin} row {self.first_row + index}"
            try:
                encoded = {**self.encode(row, where), "skipped": ""}
            except TooLongError as err:
                if self.overlong == "error":
                    raise DataFileError(f"{where}: {err} (overlong: error)") from None
                encoded = {**PLACEHOLDERS, "skipped": str(err)}
            except EncodingError as err:
                encoded = {**PLACEHOLDERS, "skipped": str(err)}
            for key, values in columns.items():
                values.append(encoded[key])
        return columns

    # ---- one row --------------------------------------------------------------------------------------------
    def encode(self, row: dict, where: str) -> dict:
        return getattr(self, f"_{self.task}")(row, where)

    def _messages(self, value, where: str):
        if self.template is None:
            raise DataFileError(f"{where}: a conversational value needs a chat template, and chat_template is "
                                f"'none' (give 'default', the tokenizer's own, or a Jinja file)")
        return check_messages(value, where)

    @staticmethod
    def _string(value, where: str, column: str) -> str:
        if not isinstance(value, str):
            raise DataFileError(f"{where}: column '{column}' must be a string or a list of messages, got "
                                f"{type(value).__name__}")
        return value

    def _completion_ids(self, text: str) -> list[int]:
        ids = tokenize(self.tokenizer, text)
        return ids if self.tokenizer.eos_token_id in ids else ids + [self.tokenizer.eos_token_id]

    def _fit(self, ids: list[int], labels: list[int]) -> dict:
        """A text or conversation kept to its first ``max_length`` tokens (TRL's truncation) or refused."""
        truncated = len(ids) > self.max_length
        if truncated and self.overlong != "truncate":
            raise TooLongError(f"{len(ids)} tokens, more than max_length={self.max_length}")
        labels = labels[:self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise EncodingError("no trained token within max_length" if truncated else "no trained token")
        return {"input_ids": ids[:self.max_length], "labels": labels, "truncated": truncated}

    def _pair(self, prompt, completion, where: str, column: str = "completion") -> tuple[list[int], list[int]]:
        """Prompt and completion ids of a standard or conversational pair (the completion ending with EOS)."""
        if is_conversation(prompt) != is_conversation(completion):
            raise DataFileError(f"{where}: 'prompt' and '{column}' must both be strings or both lists of messages")
        if is_conversation(prompt):
            prompt, completion = self._messages(prompt, where), self._messages(completion, where)
            text, (start, end) = completion_span(self.tokenizer, self.template, prompt, completion, where)
            return tokenize(self.tokenizer, text[:start]), self._completion_ids(text[start:end])
        return (tokenize(self.tokenizer, self._string(prompt, where, "prompt")),
                self._completion_ids(self._string(completion, where, column)))

    def _fit_pair(self, prompt_ids: list[int], *completions: list[int]) -> dict:
        """The pair(s) with the prompt cut from the left to fit (``overlong: truncate``) or refused."""
        truncation = "left_prompt" if self.overlong == "truncate" else "error"
        if len(completions) == 1:
            pair = encode_pair_ids(prompt_ids, completions[0], self.max_length, truncation)
        else:
            pair = encode_preference_ids(prompt_ids, *completions, self.max_length, truncation)
        return {**pair, "truncated": len(pair["prompt_ids"]) < len(prompt_ids)}

    def _sft(self, row: dict, where: str) -> dict:
        if self.format == "text":
            text = row["text"]
            if not isinstance(text, str):
                raise DataFileError(f"{where}: column 'text' must be a string, got {type(text).__name__}")
            ids = tokenize(self.tokenizer, text) + [self.tokenizer.eos_token_id]
            return self._fit(ids, ids)
        if self.format == "messages":
            messages = self._messages(row["messages"], where)
            text, spans = assistant_spans(self.tokenizer, self.template, messages, where) if \
                self.assistant_only_loss else (render(self.tokenizer, self.template, messages), [])
            encoded = tokenize_spans(self.tokenizer, text, spans, train_all=not self.assistant_only_loss,
                                     eos_token_id=self.tokenizer.eos_token_id)
            return self._fit(encoded["input_ids"], encoded["labels"])
        pair = self._fit_pair(*self._pair(row["prompt"], row["completion"], where))
        labels = pair["labels"] if self.completion_only_loss else pair["input_ids"]
        return {"input_ids": pair["input_ids"], "labels": labels, "truncated": pair["truncated"]}

    def _preference(self, row: dict, where: str) -> dict:
        if self.format == "unpaired_preference":
            return self._unpaired(row, where)
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if self.format == "implicit_preference":
            if is_conversation(chosen) != is_conversation(rejected):
                raise DataFileError(f"{where}: chosen and rejected must both be strings or both lists of messages")
            cut = common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
            if not prompt:
                raise EncodingError("chosen and rejected share no prompt")
        if chosen == rejected:
            raise EncodingError("chosen == rejected")
        prompt_ids, chosen_ids = self._pair(prompt, chosen, where, "chosen")
        _, rejected_ids = self._pair(prompt, rejected, where, "rejected")
        pair = self._fit_pair(prompt_ids, chosen_ids, rejected_ids)
        margin = row.get("margin")
        margin = 0.0 if margin is None else margin  # a missing column, or a row without one (Arrow null)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DataFileError(f"{where}: column 'margin' must be a number, got {type(margin).__name__}")
        return {key: pair[key] for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                           "rejected_labels", "truncated")} | {"margin": float(margin)}

    def _unpaired(self, row: dict, where: str) -> dict:
        """TRL's unpaired preference row: one completion of the prompt, ``label`` true when it is desirable."""
        label = row["label"]
        if not isinstance(label, bool):
            raise DataFileError(f"{where}: column 'label' must be true or false (desirable or not), got {label!r:.40}")
        pair = self._fit_pair(*self._pair(row["prompt"], row["completion"], where))
        return {"prompt_ids": pair["prompt_ids"], "completion_ids": pair["input_ids"][len(pair["prompt_ids"]):],
                "label": label, "truncated": pair["truncated"]}

    def _prompt_ids(self, prompt, where: str) -> dict:
        text = render(self.tokenizer, self.template, self._messages(prompt, where), add_generation_prompt=True) \
            if is_conversation(prompt) else prompt
        ids = tokenize(self.tokenizer, self._string(text, where, "prompt"))
        if not ids:
            raise EncodingError("the prompt is empty")
        truncated = len(ids) > self.max_length
        if truncated:
            if self.overlong != "truncate":
                raise TooLongError(f"the prompt has {len(ids)} tokens, more than max_length={self.max_length}")
            # The end of the prompt (the question, the assistant header) is what the generation continues.
            ids = ids[-self.max_length:]
            text = self.tokenizer.decode(ids)
        return {"prompt_ids": ids, "prompt": text, "truncated": truncated}

    def _prompts(self, row: dict, where: str) -> dict:
        return self._prompt_ids(row["prompt"], where)

    def _questions(self, row: dict, where: str) -> dict:
        question, answer = row["question"], row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataFileError(f"{where}: column 'question' must be a non-empty string, got {question!r:.40}")
        if answer is not None and not (isinstance(answer, str) or (
                isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer))):
            raise DataFileError(f"{where}: column 'answer' must be a string or a non-empty list of strings")
        return self._prompt_ids(row.get("prompt") or question, where)
