"""Teachers that answer questions for the teacher↔student QA loop.

:class:`LocalTeacher` runs a causal LM in this process; :class:`HTTPTeacher` asks an OpenAI-compatible
chat-completions endpoint (no logits); :class:`CachedTeacher` puts a persistent SQLite answer cache in front of
either; :func:`generate_questions` has a teacher write questions on seed topics. All share :class:`Teacher`'s interface: ``answer(questions) -> answers`` and a cache-key ``identity``.
"""
from lit_distill.teachers.base import Teacher, TeacherError
from lit_distill.teachers.cache import CachedTeacher
from lit_distill.teachers.http import HTTPTeacher
from lit_distill.teachers.local import LocalTeacher
from lit_distill.teachers.questions import generate_questions, parse_questions, write_questions
from lit_distill.teachers.writing import CompletionWriter, WritingError, write_completions

__all__ = ["CachedTeacher", "CompletionWriter", "HTTPTeacher", "LocalTeacher", "Teacher", "TeacherError",
           "WritingError", "generate_questions", "parse_questions", "write_completions", "write_questions"]
