"""Rewards that compare the completion with reference text: SQuAD exact match and token F1, sentence BLEU."""

from __future__ import annotations

from typing import Literal

from torchmetrics.functional.text import sacre_bleu_score, squad

from lit_distill.rewards.base import Reward

METRICS = ("exact", "f1", "bleu")


class ReferenceMatch(Reward):
    """Agreement of the completion with a reference answer, in [0, 1].

    * ``exact``: 1 if the completion equals a reference after SQuAD normalisation (lower case, no punctuation,
      no articles, single spaces), else 0;
    * ``f1``: SQuAD token F1 of the normalised texts;
    * ``bleu``: sentence SacreBLEU (13a tokenisation) with Lin & Och add-one smoothing of the 2..n-gram
      precisions (torchmetrics ``smooth=True``). As implemented by torchmetrics, the score is 0 whenever some
      n-gram order has no match at all, so completions or references shorter than ``bleu_n_gram`` words score 0:
      lower ``bleu_n_gram`` for short answers.

    Exact match and F1 come from torchmetrics' SQuAD metric, the same as SFT evaluation reports.

    Args:
        metric: ``"exact"``, ``"f1"`` or ``"bleu"``.
        column: dataset column holding the reference: a string, or a list of acceptable strings (the best match
            counts).
        bleu_n_gram: largest n-gram order of BLEU.
    """

    def __init__(self, metric: Literal["exact", "f1", "bleu"] = "f1", column: str = "answer", bleu_n_gram: int = 4):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"ReferenceMatch: metric must be one of {METRICS}, got '{metric}'")
        self.metric = metric
        self.reference_column = column
        self.bleu_n_gram = bleu_n_gram

    def references(self, value) -> list[str]:
        """A column value as a non-empty list of reference strings."""
        references = [value] if isinstance(value, str) else list(value)
        if not references or not all(isinstance(reference, str) for reference in references):
            raise ValueError(f"ReferenceMatch: column '{self.reference_column}' must hold a string or a non-empty "
                             f"list of strings, got {value!r}")
        return references

    def score(self, completion: str, references: list[str]) -> float:
        if self.metric == "bleu":
            # The best single-reference score, as for exact/F1 (not multi-reference BLEU, which pools n-gram counts).
            return max(sacre_bleu_score([completion], [[reference]], n_gram=self.bleu_n_gram, smooth=True).item()
                       for reference in references)
        # torchmetrics' SQuAD takes the best of several references itself and reports percentages.
        result = squad({"prediction_text": completion, "id": "0"},
                       {"answers": {"text": references, "answer_start": [0] * len(references)}, "id": "0"})
        return result["exact_match" if self.metric == "exact" else "f1"].item() / 100.0

    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        values = self.column(columns, self.reference_column)
        return [self.score(completion, self.references(value)) for completion, value in zip(completions, values)]
