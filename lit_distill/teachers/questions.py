"""Questions written by a teacher: the teacher is asked for short questions on seed topics; its replies are split
into one question per line, cleaned of list markers, deduplicated and written as a question JSONL file that
:class:`~lit_distill.data.QuestionDataModule` reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from lit_distill.data.questions import normalise_question
from lit_distill.teachers.base import Teacher

REQUEST = ("Write {count} different short questions about {topic}, each answerable in a few words. "
           "Write one question per line and nothing else.")
LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\(?\d+[.):])\s*")


def parse_questions(reply: str) -> list[str]:
    """The questions of one reply: lines ending in "?", without leading list markers ("1.", "-", "(2)")."""
    lines = (LIST_MARKER.sub("", line).strip() for line in reply.splitlines())
    return [line for line in lines if line.endswith("?") and len(line) > 1]


def generate_questions(teacher: Teacher, topics: Sequence[str], per_topic: int = 10,
                       max_rounds: int = 3) -> list[dict]:
    """Ask ``teacher`` for ``per_topic`` questions on each topic, asking again (up to ``max_rounds`` times) for the
    topics that have fewer distinct questions than that.

    Returns:
        ``{"question", "topic"}`` rows, each question once (case and whitespace ignored), topics in order.
    """
    if per_topic < 1 or max_rounds < 1:
        raise ValueError(f"per_topic and max_rounds must be >= 1, got {per_topic} and {max_rounds}")
    seen: set[str] = set()
    by_topic: dict[str, list[str]] = {topic: [] for topic in topics}
    for _ in range(max_rounds):
        wanting = [topic for topic in topics if len(by_topic[topic]) < per_topic]
        if not wanting:
            break
        replies = teacher.answer([REQUEST.format(count=per_topic - len(by_topic[topic]), topic=topic)
                                  for topic in wanting])
        for topic, reply in zip(wanting, replies):
            for question in parse_questions(reply or ""):  # a skipped request (None) gives none this round
                key = normalise_question(question)
                if key not in seen and len(by_topic[topic]) < per_topic:
                    seen.add(key)
                    by_topic[topic].append(question)
    return [{"question": question, "topic": topic} for topic in topics for question in by_topic[topic]]


def write_questions(rows: list[dict], path: str | Path) -> Path:
    """Write question rows as JSON lines (parent directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path
