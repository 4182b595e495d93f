"""The teacher interface: something that answers raw user questions with text.

A teacher is a plain Python object, not an ``nn.Module``: a LightningModule holding one never puts it in its
checkpoint or optimizer, whatever backend it wraps (a local model, a hosted endpoint, a cache in front of either).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Optional

# Called with (position in the question list, answer) as soon as an answer is known, so that a cache can keep
# what was already paid for when the rest of the batch fails.
AnswerCallback = Callable[[int, str], None]


class TeacherError(RuntimeError):
    """A teacher could not produce an answer (refused request, endpoint down after all retries, ...)."""


class RetriesExhausted(TeacherError):
    """One question got no usable answer within its retries (transient failures, empty answers)."""


class Teacher:
    """Base class of teachers.

    Subclasses implement :attr:`identity` and :meth:`answer`; :meth:`close` releases what they hold.
    """

    @property
    def identity(self) -> str:
        """A stable string naming the backend, the model and the sampling settings; a cache key part.

        Two teachers with the same identity are expected to give answers of the same distribution. It never
        contains secrets.
        """
        raise NotImplementedError

    def answer(self, questions: list[str], on_answer: AnswerCallback | None = None) -> list[Optional[str]]:
        """Answer each question.

        Args:
            questions: raw user questions; the teacher applies its own chat formatting and system prompt.
            on_answer: called as ``on_answer(index, answer)`` for each answer as soon as it is known (in any
                order, in the calling thread).

        Returns:
            One answer per question, in order, stripped of surrounding whitespace; None for a question the teacher
            skipped (no usable answer within its retries; counted in :meth:`stats`).

        Raises:
            TeacherError: the teacher cannot answer at all (a refused request, a bad key); answers already
                reported through ``on_answer`` stay valid.
        """
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        """Counters since the teacher was made (requests, retries, failures by kind, skipped questions, cache
        hits...): a module logs their change per step as ``teacher/<name>``."""
        return {}

    @property
    def num_parameters(self) -> Optional[int]:
        """The teacher model's parameter count when the backend knows it (a local model), else None."""
        return None

    def to(self, device) -> Teacher:
        """Move what runs locally to ``device`` (nothing by default); returns self."""
        return self

    def close(self) -> None:
        """Release connections, files or threads (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity})"


def identity_string(backend: str, **fields: Any) -> str:
    """A canonical identity: compact JSON of ``{"backend": backend, **fields}`` with sorted keys."""
    return json.dumps({"backend": backend, **fields}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
