"""Stop strings: end a completion once its decoded text contains one of them.

Shape legend: B batch, N completion tokens generated so far.

Checking re-decodes only a tail window of each row that is still generating. A stop string of ``b`` UTF-8 bytes
ending in the newest token spans at most ``b`` tokens (every token decodes to at least one byte), so the last
``b + 1`` tokens contain it with a token to spare in front: the window's first token, which a tokenizer may decode
differently on its own (a dropped leading space, half a multi-byte character), never holds part of the match. The
check runs after every token and a row stops at its first match, so a match in the window is always one that the
newest token completed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class StopStringMatcher:
    """Finds the rows whose completion now contains a stop string.

    Args:
        stop_strings: non-empty strings; matched in the completion's text (the prompt is never searched), decoded
            with special tokens kept, so a special token's text (e.g. ``"<|im_end|>"``) can be a stop string.
        tokenizer: a Hugging Face tokenizer with ``batch_decode``.

    Raises:
        ValueError: if a stop string is empty or not a string, or the tokenizer is missing.
    """

    def __init__(self, stop_strings: Sequence[str], tokenizer):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer (to decode completions)")
        self.stop_strings, self.tokenizer = tuple(stop_strings), tokenizer
        self.window = max(len(s.encode("utf-8")) for s in self.stop_strings) + 1

    def __call__(self, completions: Tensor, length: int, rows: Tensor) -> Tensor:
        """Rows among ``rows`` whose first ``length`` completion tokens contain a stop string ending in the last one.

        Args:
            completions: (B, >= length) generated token ids (only the first ``length`` columns are read).
            length: tokens generated so far, N.
            rows: (B,) bool, the rows to check (those still generating).

        Returns:
            (B,) bool on ``rows``' device, True where a stop string was completed; one device-to-host copy.
        """
        tails = completions[:, max(0, length - self.window):length].cpu().tolist()  # B lists of <= window ids
        candidates = rows.cpu().nonzero().flatten().tolist()
        texts = self.tokenizer.batch_decode([tails[row] for row in candidates], skip_special_tokens=False)
        hits = torch.zeros(rows.shape, dtype=torch.bool)
        for row, text in zip(candidates, texts):
            hits[row] = any(s in text for s in self.stop_strings)
        return hits.to(rows.device)
