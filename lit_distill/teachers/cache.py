"""A persistent answer cache in front of any teacher: each answer is paid for once, across runs.

Answers live in one SQLite table keyed by ``(teacher identity, question)``. Each answer is committed as soon as
the teacher reports it, so a run that dies mid-batch keeps what it already received and a restarted run asks only
for the rest. WAL mode and ``INSERT OR IGNORE`` let several processes (data-parallel ranks, parallel runs) share
one file; within a process one connection serves every thread under a lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path

from lit_distill.teachers.base import AnswerCallback, Teacher, TeacherError

SCHEMA = """CREATE TABLE IF NOT EXISTS answers (
    identity TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL,  -- Unix time
    PRIMARY KEY (identity, question)
)"""
LOOKUP_CHUNK = 500  # questions per SELECT (SQLite limits the number of bound parameters)


class CachedTeacher(Teacher):
    """``teacher`` with its answers cached in an SQLite file.

    When two processes ask the same new question at once, both pay for it and the first answer stored is kept
    (they differ only for a sampling teacher).

    Args:
        teacher: the teacher asked for answers not in the cache.
        path: the SQLite file (created with its parent directories if missing).

    Attributes:
        hits: questions answered without asking the teacher (a question repeated within a batch counts as a
            hit from its second occurrence on).
        misses: questions sent to the teacher.
    """

    def __init__(self, teacher: Teacher, path: str):
        self.teacher = teacher
        self.path = str(Path(path).expanduser())
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._connection()  # a bad path fails now, not at the first batch

    @property
    def identity(self) -> str:
        return self.teacher.identity

    @property
    def num_parameters(self) -> int | None:
        """The wrapped teacher's parameter count, None when unknown (a remote model)."""
        return self.teacher.num_parameters

    def to(self, device) -> CachedTeacher:
        """Move the wrapped teacher; returns self."""
        self.teacher.to(device)
        return self

    def answer(self, questions: list[str], on_answer: AnswerCallback | None = None) -> list[str | None]:
        """Cached answers, and the teacher's for the others, each stored on arrival (see :meth:`Teacher.answer`);
        a question the teacher skipped is None and not stored."""
        identity = self.teacher.identity
        known = self.lookup(identity, questions)
        positions = defaultdict(list)  # question -> its indices in `questions`
        for index, question in enumerate(questions):
            positions[question].append(index)
        missing = [question for question in positions if question not in known]
        with self._lock:
            self.misses += len(missing)
            self.hits += len(questions) - len(missing)
        if on_answer is not None:
            for index, question in enumerate(questions):
                if question in known:
                    on_answer(index, known[question])

        def store(index: int, text: str | None) -> None:
            question = missing[index]
            if question in known or text is None:  # a skipped question is asked again next time
                return
            self._insert(identity, question, text)
            known[question] = text
            if on_answer is not None:
                for position in positions[question]:
                    on_answer(position, text)

        if missing:
            answers = self.teacher.answer(missing, on_answer=store)
            if len(answers) != len(missing):
                raise TeacherError(f"{self.teacher!r} returned {len(answers)} answers for {len(missing)} questions")
            for index, text in enumerate(answers):  # a teacher that does not report through on_answer
                store(index, text)
        return [known.get(question) for question in questions]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.teacher.stats(), "cache_hits": self.hits, "cache_misses": self.misses}

    def lookup(self, identity: str, questions: list[str]) -> dict[str, str]:
        """``{question: answer}`` for those of ``questions`` cached under ``identity``."""
        unique = list(dict.fromkeys(questions))
        found = {}
        with self._lock:
            db = self._connection()
            for start in range(0, len(unique), LOOKUP_CHUNK):
                chunk = unique[start:start + LOOKUP_CHUNK]
                rows = db.execute(f"SELECT question, answer FROM answers WHERE identity = ? AND question IN "
                                  f"({','.join('?' * len(chunk))})", [identity, *chunk])
                found.update(rows)
        return found

    def _insert(self, identity: str, question: str, text: str) -> None:
        with self._lock:
            # Autocommit connection: the answer is on disk when this returns.
            self._connection().execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?)",
                                       (identity, question, text, time.time()))

    def _connection(self) -> sqlite3.Connection:
        """The open connection, opened (and the table created) on first use; call under the lock or in __init__."""
        if self._db is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            try:
                # isolation_level=None: autocommit; timeout: wait for other processes' writes instead of failing.
                db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")  # readers and a writer in other processes do not block
                db.execute("PRAGMA synchronous=NORMAL")  # commits survive a crashed process (not a power cut)
                db.execute(SCHEMA)
            except sqlite3.DatabaseError as err:
                raise OSError(f"cannot use '{self.path}' as a teacher answer cache (an SQLite file): {err}") from err
            self._db = db
        return self._db

    def close(self) -> None:
        """Close the database and the wrapped teacher."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        self.teacher.close()

    def __getstate__(self) -> dict:
        # A connection and a lock cannot be pickled (spawned DDP workers): the copy reopens the file.
        state = self.__dict__.copy()
        state.update(_db=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())
