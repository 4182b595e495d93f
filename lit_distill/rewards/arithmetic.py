"""Verifiable reward for the embedded arithmetic prompts (``lit_distill.data.corpus``): is the first number of
the completion the answer?"""

from __future__ import annotations

import re

from lit_distill.data.corpus import number_words
from lit_distill.rewards.base import Reward


def _key(words: str) -> str:
    """Spelling-insensitive key of a number in words: "Twenty one", "twenty-one" -> "twentyone"."""
    return re.sub(r"[\s-]+|\band\b", "", words.lower())


def _pattern(words: str) -> str:
    """Regex of one number in words, with any run of spaces/hyphens between its words and an optional "and"."""
    return r"[\s-]+(?:and\s+)?".join(re.escape(part) for part in re.split(r"[\s-]+(?:and\s+)?", words))


# Every number the corpus writes in words (number_words covers 0-999), by spelling-insensitive key.
WORD_VALUES = {_key(number_words(n)): n for n in range(1000)}
# Longest phrases first, so that "twenty-one" wins over "twenty" and "one hundred and five" over "one".
_SPELLINGS = sorted((number_words(n) for n in range(1000)), key=len, reverse=True)
NUMBER = re.compile(r"(?P<digits>-?\d+(?:\.\d+)?)|\b(?P<words>" + "|".join(map(_pattern, _SPELLINGS)) + r")\b",
                    re.IGNORECASE)


def first_number(text: str) -> float | None:
    """The first number in ``text``: decimal digits (``"12"``, ``"-3"``, ``"2.5"``) or English words as the
    corpus writes them (``"twelve"``, ``"twenty-one"``, ``"one hundred and five"``); ``None`` if there is none.

    A run of digits is one number, so ``"1 2"`` reads as 1 and ``"12."`` as 12.
    """
    match = NUMBER.search(text)
    if match is None:
        return None
    if match["digits"] is not None:
        return float(match["digits"])
    return float(WORD_VALUES[_key(match["words"])])


class ArithmeticReward(Reward):
    """1.0 if the first number in the completion equals the integer answer, else 0.0 (also when there is none).

    Made for ``lit_distill.data.corpus.arithmetic_problems`` ("What is 7 plus 5?") and statement prompts
    ("7 plus 5 is"), whose answers are decimal strings; only the first number counts, so a completion cannot
    collect the reward by listing several candidates.

    Args:
        column: the dataset column holding the answer (an int or a decimal string).
    """

    def __init__(self, column: str = "answer"):
        super().__init__()
        self.answer_column = column

    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        answers = self.column(columns, self.answer_column)
        rewards = []
        for completion, answer in zip(completions, answers):
            try:
                expected = int(str(answer).strip())
            except ValueError:
                raise ValueError(f"ArithmeticReward: column '{self.answer_column}' must hold integers, got "
                                 f"{answer!r}") from None
            rewards.append(float(first_number(completion) == expected))
        return rewards
