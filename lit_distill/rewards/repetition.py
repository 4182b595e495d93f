"""A penalty on completions that repeat themselves (the degenerate loops small policies fall into)."""

from __future__ import annotations

from lit_distill.rewards.base import Reward


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Fraction of the word n-grams of ``text`` that occurred earlier in it; 0 for fewer than ``n`` words.

    Words are whitespace-separated and case-sensitive. ``"a b c a b c"`` with n = 3 has the n-grams
    ``abc bca cab abc``, of which the last repeats the first: 1/4.
    """
    words = text.split()
    ngrams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not ngrams:
        return 0.0
    return (len(ngrams) - len(set(ngrams))) / len(ngrams)


class RepetitionPenalty(Reward):
    """−(fraction of the completion's word n-grams that repeat an earlier n-gram of it), in [−1, 0].

    A completion with fewer than ``n`` words scores 0 (no n-gram can repeat).

    Args:
        n: n-gram length in words.
    """

    def __init__(self, n: int = 3):
        super().__init__()
        if n < 1:
            raise ValueError(f"RepetitionPenalty: n must be >= 1, got {n}")
        self.n = n

    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        return [-repeated_ngram_fraction(completion, self.n) for completion in completions]
