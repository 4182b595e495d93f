"""Conversations (lists of ``{"role", "content"}`` messages) rendered by a chat template and tokenised with the
assistant's tokens located, for an assistant-only loss.

Where the assistant's tokens are is read from the template's own rendering, not from generation markers
(``{% generation %}``) that few templates have: assistant turn ``i`` spans from the end of
``render(messages[:i], add_generation_prompt=True)`` (the prompt a model answers at inference) to the end of
``render(messages[:i + 1])``. That holds for every template whose rendering of a conversation extends the
rendering of its beginning; one that does not (e.g. a template that drops earlier turns' reasoning) is refused with
a clear error rather than masked wrongly.

The rendered text is cut at those span boundaries and each piece tokenised on its own, so no BPE merge crosses
from prompt into answer: the answer's tokens are those the model generates after the prompt. A template that ends
assistant turns without the tokenizer's EOS (the package's ``DEFAULT_CHAT_TEMPLATE``) gets EOS appended to each
assistant turn, so the model learns to stop.
"""

from __future__ import annotations

from typing import Optional

from transformers import PreTrainedTokenizerBase

from lit_distill.data.collate import IGNORE_INDEX, tokenize
from lit_distill.data.io import DataFileError

Messages = list[dict]
Span = tuple[int, int]  # [start, end) character offsets of a trained part of the rendered text
LOSS_SWITCH = "assistant_only_loss: false (completion_only_loss: false for prompt-completion data)"


class TemplateError(ValueError):
    """The chat template renders a conversation in a way the trained tokens cannot be located in."""


def is_conversation(value) -> bool:
    """True for a list of messages (dicts), the conversational form of a dataset column."""
    return isinstance(value, list) and all(isinstance(message, dict) for message in value)


def check_messages(messages, where: str) -> Messages:
    """``messages`` checked, with keys whose value is None dropped (Arrow gives every message every key that any
    message of the column has, e.g. ``name: None``).

    Raises:
        DataFileError: naming ``where`` and the message: not a non-empty list of objects, a message without a
            string ``role``, a ``content`` that is not a string, or an assistant turn with no content (and no
            ``tool_calls``).
    """
    if not is_conversation(messages) or not messages:
        raise DataFileError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got "
                            f"{messages!r:.60}")
    checked = []
    for index, message in enumerate(messages):
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if not isinstance(role, str):
            raise DataFileError(f"{where}: message {index} has no 'role' string (its keys are {sorted(message)})")
        content = message.get("content", "")
        if not isinstance(content, str):
            raise DataFileError(f"{where}: message {index} ({role}): 'content' must be a string, got "
                                f"{type(content).__name__} (only text conversations are supported)")
        if role == "assistant" and not content.strip() and "tool_calls" not in message:
            raise DataFileError(f"{where}: message {index} is an empty assistant turn")
        checked.append(message)
    return checked


def render(tokenizer: PreTrainedTokenizerBase, template: str, messages: Messages,
           add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _continuation(tokenizer, template: str, head: Messages, whole: Messages, where: str,
                  what: str) -> tuple[str, Span]:
    """``render(whole)`` and its span that follows ``render(head, add_generation_prompt=True)``."""
    prompt, text = render(tokenizer, template, head, add_generation_prompt=True), render(tokenizer, template, whole)
    if not text.startswith(prompt):
        raise TemplateError(f"{where}: the chat template does not render {what} as a continuation of the "
                            f"messages before it (rendered with the generation prompt: {prompt[-60:]!r}; the "
                            f"conversation through it: {text[-80:]!r}), so its tokens cannot be located; set "
                            f"{LOSS_SWITCH} to train on every token")
    return text, (len(prompt), len(text))


def assistant_spans(tokenizer, template: str, messages: Messages, where: str) -> tuple[str, list[Span]]:
    """The rendered conversation and the span of each assistant turn in it (see the module docstring)."""
    text = render(tokenizer, template, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            through, span = _continuation(tokenizer, template, messages[:index], messages[:index + 1], where,
                                          f"message {index} (assistant)")
            if not text.startswith(through):
                raise TemplateError(f"{where}: the chat template renders the conversation through message {index} "
                                    f"differently inside the whole conversation; set {LOSS_SWITCH} to train on "
                                    f"every token")
            spans.append(span)
    return text, spans


def completion_span(tokenizer, template: str, prompt: Messages, completion: Messages, where: str) -> tuple[str, Span]:
    """The rendered ``prompt + completion`` and the span of the completion in it."""
    return _continuation(tokenizer, template, prompt, prompt + completion, where, "the completion")


def tokenize_spans(tokenizer: PreTrainedTokenizerBase, text: str, spans: list[Span], train_all: bool = False,
                   eos_token_id: Optional[int] = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of ``text``, each piece between span boundaries tokenised on its own.

    Args:
        spans: sorted, non-overlapping ``[start, end)`` character spans of the trained parts.
        train_all: label every token, not only the spans' (the pieces and EOS handling stay the same).
        eos_token_id: appended (and labelled) to a span whose tokens do not contain it; None: never.
    """
    input_ids, labels, position = [], [], 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, trained in ((text[position:start], False), (text[start:end], True)):
            if not piece:
                continue
            ids = tokenize(tokenizer, piece)
            if trained and eos_token_id is not None and eos_token_id not in ids:
                ids.append(eos_token_id)
            input_ids += ids
            labels += ids if trained or train_all else [IGNORE_INDEX] * len(ids)
        position = end
    return {"input_ids": input_ids, "labels": labels}
