"""Teacher-written training data (sequence-level KD, Kim & Rush 2016): a teacher completes a prompt set into a
JSONL file of ``{"prompt": ..., "completion": ...}`` rows, which a student then trains on, e.g. with
``WikiTextDataModule(source=FILE, text_field="completion")``.

    python -m lit_distill write-data --model smollm2-135m-instruct --prompts configs/distill/smollm2_prompts.jsonl \\
        --output runs/smollm2_written/data.jsonl --max-new-tokens 192 --temperature 0.8 --top-p 0.95 --seed 0
    python -m lit_distill write-data --base-url http://127.0.0.1:8080/v1 --model smollm2 --api-key-env MY_KEY \\
        --cache runs/teacher.sqlite --prompts prompts.txt --output runs/written/data.jsonl

Teacher: ``--model`` is loaded locally (hub id, directory, ``.gguf`` file or alias such as
``smollm2-135m-instruct``) and samples ``--batch-size`` prompts together; with ``--base-url`` it is the model an
OpenAI-compatible endpoint serves, asked ``--batch-size`` requests at a time, with the key read from the
environment variable named by ``--api-key-env``. ``--cache`` puts an SQLite answer cache in front of either.
Prompts: a text file (one per non-blank line) or a ``.jsonl`` file with a string ``prompt`` per line.

Next to ``FILE.jsonl``, ``FILE.jsonl.meta.json`` records the teacher's identity (backend, model and every sampling
setting, never a secret), the prompt file with its sha256, the number of prompts, the date and the package
version; it is written once, when the file is started. Its name keeps it beside the data, and no DataModule takes
it for a split file (``train.jsonl.meta.json`` is not ``train.jsonl``).

Resuming: rows are appended and flushed one by one as the teacher answers, so a run that is killed keeps what it
wrote. Rerunning the same command completes only the prompts without a row (a partial last line, as a killed write
leaves it, is dropped). A greedy run resumed this way ends with the same file as an uninterrupted one; a sampling
run draws the rest afresh (same distribution, other draws). A rerun whose teacher, settings or prompts differ from
the metadata stops with an error naming the differing field; ``--overwrite`` starts the file again instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

from lit_distill.data.io import DataFileError, read_numbered_jsonl, read_prompts_file
from lit_distill.teachers.base import Teacher, TeacherError

METADATA_SUFFIX = ".meta.json"
OUTPUT_SUFFIX = ".jsonl"  # the DataModules pick their reader by suffix


class WritingError(ValueError):
    """An output the run may not write or resume; the message names the file and, for a mismatch, the field."""


@dataclass
class WriteSummary:
    """What :meth:`CompletionWriter.write` did.

    Attributes:
        output: the JSONL file.
        metadata: its metadata file.
        rows: rows in the file now (one per prompt).
        resumed: rows that were already there.
        dropped_bytes: size of the partial last line that was cut off (0: none).
    """

    output: Path
    metadata: Path
    rows: int
    resumed: int
    dropped_bytes: int


def metadata_path(output_path: str | Path) -> Path:
    """The metadata file of an output file: ``FILE.jsonl`` -> ``FILE.jsonl.meta.json``."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + METADATA_SUFFIX)


class CompletionWriter:
    """Writes a teacher's completion of each prompt to a JSONL file, continuing the rows an earlier run left.

    Construction checks everything that does not need the teacher, so that a command fails before it loads a
    model: the output path, the recorded prompts, and the rows already written (a partial last line is cut off
    here: it holds no data under any settings). :meth:`write` then compares the teacher with the metadata and
    appends the missing rows.

    Args:
        output_path: the JSONL file to write (``.jsonl``; parent directories are created).
        prompts: the prompt set, in order; a prompt that occurs twice gets two rows.
        prompts_file: the file the prompts were read from, recorded with its sha256 (None: given in Python).
        overwrite: replace an existing output and its metadata (when :meth:`write` starts) instead of resuming.

    Attributes:
        remaining: the prompts without a row yet, in prompt order.
        rows: complete rows in the file.

    Raises:
        WritingError: the output is not writable, or exists with other prompts or without metadata.
        DataFileError: a complete line of the existing output is not a row (the message names ``file:line``).
    """

    def __init__(self, output_path: str | Path, prompts: Sequence[str], prompts_file: str | Path | None = None,
                 overwrite: bool = False):
        if not prompts:
            raise WritingError("no prompts to complete")
        self.output = Path(output_path).expanduser()
        self.metadata_path = metadata_path(self.output)
        self.prompts = list(prompts)
        self.overwrite = overwrite
        self.prompts_record = {
            "file": str(Path(prompts_file).resolve()) if prompts_file is not None else None,
            "file_sha256": _sha256(Path(prompts_file).read_bytes()) if prompts_file is not None else None,
            "count": len(self.prompts),
            # The resume key: the prompts themselves, so a reformatted or moved file with the same prompts resumes.
            "sha256": _sha256(json.dumps(self.prompts, ensure_ascii=False).encode("utf-8")),
        }
        _check_writable(self.output)
        self.recorded = None if overwrite else self._read_metadata()
        self.dropped_bytes = 0
        self.rows = 0
        self.remaining = list(self.prompts)
        if not overwrite and self.output.exists():
            self._read_rows()

    def write(self, teacher: Teacher, progress: Callable[[int, int], None] | None = None,
              settings: dict[str, Any] | None = None) -> WriteSummary:
        """Have ``teacher`` complete the remaining prompts, appending and flushing each row as it arrives.

        Args:
            teacher: any :class:`Teacher`; its identity must equal the recorded one when resuming.
            progress: called as ``progress(rows, total)`` after each row written.
            settings: more of the run's settings to record under ``settings`` when the file is started (batch
                size, cache file, ...); informational, not compared on resume.

        Returns:
            What was written.

        Raises:
            WritingError: the metadata records another teacher identity (the message names the differing fields).
            TeacherError: from the teacher; the rows written before it stay in the file.
        """
        identity = _parse_identity(teacher.identity)
        if self.recorded is not None:
            differences = _differences(self.recorded.get("teacher"), identity, "teacher")
            if differences:
                raise WritingError(f"{self.metadata_path} records other settings than this run's: "
                                   f"{'; '.join(differences)}. Rerun with the recorded settings to resume, or "
                                   f"overwrite (--overwrite) to replace {self.output}")
        if self.overwrite:
            self.output.unlink(missing_ok=True)
            self.metadata_path.unlink(missing_ok=True)
            self.overwrite = False  # a second write() resumes this one
        resumed = self.rows
        if self.recorded is None:
            self.recorded = {"teacher": identity, "prompts": self.prompts_record, "settings": settings or {},
                             "created": _now(), "lit_distill_version": _package_version()}
            # Before the first row: a run killed from here on leaves a file that can be resumed.
            _write_json_atomically(self.metadata_path, self.recorded)
        if self.remaining:
            self._append(teacher, progress)
        return WriteSummary(self.output, self.metadata_path, self.rows, resumed, self.dropped_bytes)

    def _append(self, teacher: Teacher, progress: Callable[[int, int], None] | None) -> None:
        prompts = self.remaining
        written: set[int] = set()
        with self.output.open("a", encoding="utf-8") as handle:
            def append(index: int, completion: str | None) -> None:
                if index in written or completion is None:  # a skipped prompt stays remaining: a rerun asks again
                    return
                handle.write(json.dumps({"prompt": prompts[index], "completion": completion},
                                        ensure_ascii=False) + "\n")
                handle.flush()  # in the OS's hands now: it survives the process being killed
                written.add(index)
                self.rows += 1
                if progress is not None:
                    progress(self.rows, len(self.prompts))

            try:
                answers = teacher.answer(prompts, on_answer=append)
                for index, completion in enumerate(answers):  # a teacher that does not report through on_answer
                    append(index, completion)
            finally:
                self.remaining = [prompt for index, prompt in enumerate(prompts) if index not in written]

    def _read_metadata(self) -> dict | None:
        """The recorded metadata, checked against the prompts; None when the file is new."""
        if not self.metadata_path.exists():
            if self.output.exists() and self.output.stat().st_size > 0:
                raise WritingError(f"{self.output} exists without its metadata file {self.metadata_path.name}, so "
                                   f"it cannot be resumed; overwrite (--overwrite) to replace it, or choose another "
                                   f"output")
            return None
        try:
            recorded = json.loads(self.metadata_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise WritingError(f"{self.metadata_path}: not JSON ({err}); overwrite (--overwrite) to start "
                               f"{self.output} again") from None
        prompts = recorded.get("prompts") if isinstance(recorded, dict) else None
        if not isinstance(prompts, dict):
            raise WritingError(f"{self.metadata_path}: no 'prompts' record; overwrite (--overwrite) to start "
                               f"{self.output} again")
        if prompts.get("sha256") != self.prompts_record["sha256"]:
            now = self.prompts_record
            raise WritingError(f"{self.metadata_path} records other prompts than this run's: prompts (recorded "
                               f"{prompts.get('count')} from {prompts.get('file')}, sha256 "
                               f"{str(prompts.get('sha256'))[:12]}; now {now['count']} from {now['file']}, sha256 "
                               f"{now['sha256'][:12]}). Rerun with the recorded prompts to resume, or overwrite "
                               f"(--overwrite) to replace {self.output}")
        return recorded

    def _read_rows(self) -> None:
        """Count the rows already written against the prompts, cutting off a partial last line first."""
        data = self.output.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            os.truncate(self.output, complete)
            self.dropped_bytes = len(data) - complete
        occurrences = Counter(self.prompts)
        written = Counter()
        for line_number, row in read_numbered_jsonl(self.output, required=("prompt", "completion"),
                                                    strings=("prompt", "completion")):
            if written[row["prompt"]] == occurrences[row["prompt"]]:
                raise WritingError(f"{self.output}:{line_number}: a row for a prompt that is not in the prompt set, "
                                   f"or has more rows than it occurs there: {row['prompt']!r:.80}; overwrite "
                                   f"(--overwrite) to start the file again")
            written[row["prompt"]] += 1
        self.rows = sum(written.values())
        # The first occurrences of a repeated prompt count as the written ones.
        self.remaining = []
        for prompt in self.prompts:
            if written[prompt]:
                written[prompt] -= 1
            else:
                self.remaining.append(prompt)


def write_completions(teacher: Teacher, prompts: Sequence[str], output_path: str | Path,
                      prompts_file: str | Path | None = None, overwrite: bool = False,
                      progress: Callable[[int, int], None] | None = None,
                      settings: dict[str, Any] | None = None) -> WriteSummary:
    """Write ``teacher``'s completion of each prompt to ``output_path``, resuming an earlier run's rows.

    See :class:`CompletionWriter` (arguments, checks and errors) and :meth:`CompletionWriter.write`.
    """
    return CompletionWriter(output_path, prompts, prompts_file, overwrite).write(teacher, progress, settings)


# ---- helpers ------------------------------------------------------------------------------------------------------
def _check_writable(output: Path) -> None:
    if output.suffix != OUTPUT_SUFFIX:
        raise WritingError(f"output {output} must end in {OUTPUT_SUFFIX} (the DataModules choose the reader by "
                           f"suffix)")
    if output.is_dir():
        raise WritingError(f"output {output} is a directory; expected a file path ending in {OUTPUT_SUFFIX}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WritingError(f"cannot create the output directory {output.parent}: {err.strerror}") from None
    for path in (output.parent, output, metadata_path(output)):
        if path.exists() and not os.access(path, os.W_OK):
            raise WritingError(f"cannot write {path}: permission denied")


def _parse_identity(identity: str) -> Any:
    """A teacher identity as JSON (the package's teachers), or the string itself (another teacher's format)."""
    try:
        return json.loads(identity)
    except ValueError:
        return identity


def _differences(recorded: Any, current: Any, name: str) -> list[str]:
    """``"name.field (recorded X, now Y)"`` for each leaf field that differs between two JSON values."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [difference for key in sorted(recorded.keys() | current.keys())
                for difference in _differences(recorded.get(key), current.get(key), f"{name}.{key}")]
    if recorded == current:
        return []
    return [f"{name} (recorded {json.dumps(recorded, ensure_ascii=False)}, now "
            f"{json.dumps(current, ensure_ascii=False)})"]


def _write_json_atomically(path: Path, data: dict) -> None:
    # A kill during the write leaves the old file or the new one, never half of one.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _package_version() -> Optional[str]:
    try:
        return version("lit_distill")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return None


# ---- command line -------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lit_distill write-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="local model (hub id, directory, .gguf file, alias), or the endpoint's model name")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the endpoint's API key (default: OPENAI_API_KEY)")
    parser.add_argument("--cache", help="SQLite file caching the teacher's answers across runs")
    parser.add_argument("--prompts", required=True, help="one prompt per line, or .jsonl with a 'prompt' field")
    parser.add_argument("--output", required=True, help="JSONL file to write (resumed if it exists)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output instead of resuming it")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest completion in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (needs --temperature > 0)")
    parser.add_argument("--seed", type=int, help="seed of the sampling (local model; default 0)")
    parser.add_argument("--system-prompt", help="system message before each prompt")
    parser.add_argument("--chat-template",
                        help="local model: 'default' (the tokenizer's or the package's; the default), 'none' (raw "
                             "prompts) or a Jinja template file; an endpoint applies its own")
    parser.add_argument("--stop", action="append", default=[], help="end a completion before this string "
                                                                    "(repeatable)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="prompts generated together (local) or requests in flight (endpoint); default 16")
    parser.add_argument("--device", help="local model: where it runs (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="local model: weight dtype (default float32; bf16 is slow on CPUs without bf16 units)")
    args = parser.parse_args(argv)
    if args.base_url:
        local_only = [flag for flag, value in (("--seed", args.seed), ("--chat-template", args.chat_template),
                                               ("--device", args.device), ("--dtype", args.dtype)) if value is not None]
        if local_only:
            parser.error(f"{', '.join(local_only)}: for a local model only, not with --base-url")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--max-new-tokens and --batch-size must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.temperature == 0 and args.top_p != 1:
        parser.error("--top-p needs sampling (--temperature > 0)")
    return args


def build_teacher(args: argparse.Namespace) -> Teacher:
    """The teacher the parsed arguments describe (a local model loads here)."""
    from lit_distill.teachers.cache import CachedTeacher
    from lit_distill.teachers.http import HTTPTeacher

    if args.base_url:
        teacher = HTTPTeacher(args.base_url, args.model, api_key_env=args.api_key_env, temperature=args.temperature,
                              max_tokens=args.max_new_tokens, top_p=args.top_p, system_prompt=args.system_prompt,
                              stop=args.stop, concurrency=args.batch_size)
    else:
        import torch

        from lit_distill.models.loading import ModelSpec
        from lit_distill.teachers.local import LocalTeacher

        teacher = LocalTeacher(ModelSpec(args.model, dtype=args.dtype or "float32"), max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p,
                               chat_template=args.chat_template or "default", system_prompt=args.system_prompt,
                               batch_size=args.batch_size, stop_strings=args.stop,
                               seed=0 if args.seed is None else args.seed,
                               device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return CachedTeacher(teacher, args.cache) if args.cache else teacher


def run(argv: Optional[list[str]] = None) -> WriteSummary:
    """Parse ``argv`` and write the data; prints progress to stderr and a summary to stdout.

    Raises:
        WritingError, DataFileError, FileNotFoundError: bad input, raised before any model loads (a teacher
            mismatch, found once the teacher is built, and a teacher failure, after the rows it answered are
            written, are WritingErrors too).
    """
    args = parse_args(argv)
    prompts = read_prompts_file(args.prompts)
    writer = CompletionWriter(args.output, prompts, args.prompts, args.overwrite)
    if writer.dropped_bytes:
        print(f"dropped a partial last line ({writer.dropped_bytes} bytes) of {writer.output}", file=sys.stderr)
    start = time.perf_counter()
    try:
        teacher = build_teacher(args)
    except ValueError as err:  # the teachers' own checks of their settings, a model path that is no model
        raise WritingError(str(err)) from err
    first = writer.rows

    def progress(rows: int, total: int) -> None:
        if rows == total or (rows - first) % args.batch_size == 0:
            rate = (rows - first) / (time.perf_counter() - start)
            print(f"{rows}/{total} rows ({rate:.2f} rows/s)", file=sys.stderr, flush=True)

    try:
        with teacher:
            summary = writer.write(teacher, progress, settings={"batch_size": args.batch_size, "cache": args.cache})
    except (TeacherError, KeyboardInterrupt) as err:
        raise WritingError(f"{err or 'interrupted'}; {writer.rows} of {len(prompts)} rows are in {writer.output}: "
                           f"rerun the same command to write the rest") from err
    print(f"{summary.output}: {summary.rows} rows ({summary.rows - summary.resumed} written now, {summary.resumed} "
          f"already there) in {time.perf_counter() - start:.1f} s; metadata in {summary.metadata}")
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    """The command line: user errors end the process with one line, ``error: ...``."""
    try:
        run(argv)
    except (WritingError, DataFileError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
