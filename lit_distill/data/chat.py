"""Prompt formatting shared by every DataModule that builds prompts: raw text, a chat template, or a template file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

from transformers import PreTrainedTokenizerBase

# Used when chat_template="default" and the tokenizer ships none (the package tokenizer defines the special
# tokens <|user|> and <|assistant|> for it). A system message, having no special token, is plain leading text.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@lru_cache(maxsize=None)
def _read_template(path: str) -> str:
    # Cached: a DataModule formats every example of a split with the same file.
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"chat_template '{path}' is neither 'default', 'none' nor an existing Jinja "
                                f"template file")
    return file.read_text(encoding="utf-8")


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> Optional[str]:
    """The Jinja template that ``chat_template`` names: None for ``"none"``; for ``"default"`` the tokenizer's own,
    or :data:`DEFAULT_CHAT_TEMPLATE` if it has none; otherwise the contents of that template file.

    Raises:
        FileNotFoundError: ``chat_template`` is neither keyword nor an existing file.
    """
    if chat_template == "none":
        return None
    if chat_template == "default":
        return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    return _read_template(chat_template)


def format_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, chat_template: str = "default",
                  system: Optional[str] = None) -> str:
    """The text a model is given to answer ``user_text``, ending where its reply starts.

    Args:
        tokenizer: its own ``chat_template`` is used for ``"default"`` when it has one.
        user_text: the user turn (already filled from a prompt template).
        chat_template: ``"none"``: ``user_text`` unchanged (base models); ``"default"``: the tokenizer's
            chat template, or :data:`DEFAULT_CHAT_TEMPLATE` if it has none; otherwise a path to a Jinja
            chat template file (the Hugging Face ``messages`` / ``add_generation_prompt`` convention).
        system: optional system message (ignored by ``"none"``).

    Returns:
        The formatted prompt, with the generation prompt (e.g. ``<|assistant|>\\n``) appended.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    if template is None:
        return user_text
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)
