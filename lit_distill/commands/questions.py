"""Have a teacher write questions on seed topics, deduplicated, into a question JSONL file for the agent loop.

    python -m lit_distill generate-questions --model smollm2-135m-instruct --topics "the solar system" "bread baking" \\
        --per-topic 20 --out runs/questions.jsonl
    python -m lit_distill generate-questions --base-url http://127.0.0.1:8000/v1 --model smollm2 --topics rivers --out q.jsonl

Then: ``--data.class_path lit_distill.data.QuestionDataModule --data.init_args.path runs/questions.jsonl``.
With ``--base-url`` the teacher is an OpenAI-compatible endpoint (key from ``--api-key-env``), else ``--model`` is
loaded locally (hub id, directory, ``.gguf`` or alias). ``--cache`` keeps the replies (a rerun asks nothing again).
"""

from __future__ import annotations

import argparse
from typing import Optional

from lit_distill.models.loading import ModelSpec
from lit_distill.teachers import CachedTeacher, HTTPTeacher, LocalTeacher, generate_questions, write_questions


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_distill generate-questions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model (id, dir, .gguf, alias) or the endpoint's model")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--topics", nargs="+", required=True)
    parser.add_argument("--per-topic", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reply length (local or endpoint)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--cache", help="SQLite file caching the teacher's replies")
    parser.add_argument("--out", required=True, help="question JSONL file to write")
    args = parser.parse_args(argv)
    if args.base_url:
        teacher = HTTPTeacher(args.base_url, args.model, api_key_env=args.api_key_env, temperature=args.temperature,
                              max_tokens=args.max_new_tokens)
    else:
        teacher = LocalTeacher(ModelSpec(args.model), max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.cache:
        teacher = CachedTeacher(teacher, args.cache)
    with teacher:
        rows = generate_questions(teacher, args.topics, args.per_topic)
    path = write_questions(rows, args.out)
    print(f"wrote {len(rows)} questions on {len(args.topics)} topics to {path}")

