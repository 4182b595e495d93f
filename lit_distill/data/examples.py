"""Write the embedded corpus as JSON-lines files, one per dataset format of :mod:`lit_distill.data.formats`, for
the "bring your own data" configs and tests (offline, in seconds)::

    python -m lit_distill.data.examples data/examples            # 2,000 rows per file
    python -m lit_distill.data.examples data/examples --rows 200

Each file is what a user of TRL would bring in that format; ``HFDataModule(path=...)`` reads any of them.
Conversations are the corpus's customer/assistant dialogs; prompt-completion and preference rows are its
SQuAD-shaped questions (the rejected answer a corruption of the gold one, as ``SQuADPreferenceDataModule`` draws
it); prompt-only rows are its sums cut before the result, with the ``answer`` column ``ArithmeticReward`` reads.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lit_distill.data import corpus
from lit_distill.data.preference import CORRUPTIONS, corrupt
from lit_distill.data.squad import DEFAULT_PROMPT_TEMPLATE, SQuADExample

FILES = ("text", "messages", "prompt_completion", "conversational_prompt_completion", "preference",
         "conversational_preference", "implicit_preference", "unpaired_preference", "prompt_only", "questions")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def format_rows(rows: int, seed: int = 0) -> dict[str, list[dict]]:
    """``{file stem: rows}`` for every name of :data:`FILES`, ``rows`` rows each, drawn from ``seed``."""
    dialogs = corpus.dialogs(rows, seed)
    roles = ("user", "assistant")
    qa = [SQuADExample(e.id, e.context, e.question, (e.answer,)) for e in corpus.qa_examples(rows, seed)]
    pairs = []
    for example in qa:
        drawn = corrupt(example, qa, random.Random(f"{seed}:{example.id}"), list(CORRUPTIONS), [1.0] * len(CORRUPTIONS))
        if drawn is not None:
            pairs.append((DEFAULT_PROMPT_TEMPLATE.format(context=example.context, question=example.question),
                          example.answers[0], drawn[1], example.id))
    return {
        "text": [{"text": document} for document in corpus.text_documents(rows, seed)],
        "messages": [{"messages": [{"role": roles[turn % 2], "content": text} for turn, text in enumerate(dialog)]}
                     for dialog in dialogs],
        "prompt_completion": [{"prompt": prompt, "completion": " " + gold} for prompt, gold, _, _ in pairs],
        "conversational_prompt_completion": [{"prompt": _user(prompt), "completion": _assistant(gold)}
                                             for prompt, gold, _, _ in pairs],
        "preference": [{"prompt": prompt, "chosen": " " + gold, "rejected": " " + wrong}
                       for prompt, gold, wrong, _ in pairs],
        "conversational_preference": [{"prompt": _user(prompt), "chosen": _assistant(gold),
                                       "rejected": _assistant(wrong)} for prompt, gold, wrong, _ in pairs],
        "implicit_preference": [{"chosen": f"{prompt} {gold}", "rejected": f"{prompt} {wrong}"}
                                for prompt, gold, wrong, _ in pairs],
        # KTO's rows: each pair gives one labelled completion, the gold answer and the corruption in turn.
        "unpaired_preference": [{"prompt": prompt, "completion": " " + (wrong if index % 2 else gold),
                                 "label": not index % 2} for index, (prompt, gold, wrong, _) in enumerate(pairs)],
        "prompt_only": [{"prompt": p.prompt, "answer": p.answer} for p in corpus.arithmetic_statements(rows, seed)],
        "questions": [{"question": prompt, "answer": gold, "id": id_} for prompt, gold, _, id_ in pairs],
    }


def write_examples(directory: str | Path, rows: int = 2000, seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Write ``<directory>/<format>.jsonl`` for every name of :data:`FILES`; returns the paths written.

    Raises:
        FileExistsError: a file of that name holds other content, and ``overwrite`` is false.
    """
    directory = Path(directory)
    texts = {directory / f"{stem}.jsonl": "".join(json.dumps(line) + "\n" for line in lines)
             for stem, lines in format_rows(rows, seed).items()}
    clashes = [str(path) for path, text in texts.items()
               if path.exists() and path.read_text(encoding="utf-8") != text]
    if clashes and not overwrite:
        raise FileExistsError(f"{', '.join(clashes)} already exist with other content; pass --overwrite to "
                              f"replace them")
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        path.write_text(text, encoding="utf-8")
    return list(texts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where the .jsonl files go (created if missing)")
    parser.add_argument("--rows", type=int, default=2000, help="rows per file (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace files of these names that differ")
    args = parser.parse_args(argv)
    for path in write_examples(args.directory, args.rows, args.seed, args.overwrite):
        print(path)


if __name__ == "__main__":
    main()
