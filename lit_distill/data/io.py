"""Read local data files with errors that name the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataFileError(ValueError):
    """A data file could not be read as expected (message names file, line and field)."""


def read_jsonl(path: str | Path, required: Iterable[str] = (), strings: Iterable[str] = ()) -> list[dict]:
    """Parse a JSON-lines file; blank lines are skipped, every other line must be an object with ``required``
    fields, of which those in ``strings`` must hold strings."""
    return [row for _, row in read_numbered_jsonl(path, required, strings)]


def read_numbered_jsonl(path: str | Path, required: Iterable[str] = (),
                        strings: Iterable[str] = ()) -> list[tuple[int, dict]]:
    """:func:`read_jsonl` with each row's 1-based line number in the file (blank lines counted), for callers that
    validate further and must name the line: ``[(line_number, row), ...]``."""
    path = _existing(path)
    required = tuple(required)
    rows = []
    for line_number, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}:{line_number}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
        missing = [name for name in required if name not in row]
        if missing:
            raise DataFileError(f"{path}:{line_number}: missing field(s) {missing}; the line has {sorted(row)}")
        for name in strings:
            if not isinstance(row[name], str):
                raise DataFileError(f"{path}:{line_number}: field '{name}' must be a string, "
                                    f"got {type(row[name]).__name__}")
        rows.append((line_number, row))
    return rows


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Texts from a .txt file (one per line), a JSONL file (``text_field`` of each row) or a parquet file."""
    path = _existing(path)
    if path.suffix in TEXT_SUFFIXES:
        return read_utf8(path).splitlines()
    if path.suffix in JSONL_SUFFIXES:
        return [row[text_field] for row in read_jsonl(path, required=[text_field], strings=[text_field])]
    if path.suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataFileError(f"{path}: no column '{text_field}'; columns are {table.column_names}")
        texts = table.column(text_field).to_pylist()
        for row_number, value in enumerate(texts):
            if not isinstance(value, str):
                raise DataFileError(f"{path}: row {row_number}: field '{text_field}' must be a string, "
                                    f"got {type(value).__name__}")
        return texts
    raise DataFileError(f"{path}: unsupported file type '{path.suffix}'; expected one of "
                        f"{TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES}")


def read_prompts_file(path: str) -> list[str]:
    """Prompts of a text file (one per non-blank line) or of a JSONL file (a string ``prompt`` field per line).

    Raises:
        FileNotFoundError: the file does not exist.
        DataFileError: a malformed line (the message names ``file:line``), another file type, or no prompts.
    """
    suffix = Path(path).suffix
    if suffix in JSONL_SUFFIXES:
        prompts = [row["prompt"] for _, row in read_numbered_jsonl(path, required=["prompt"], strings=["prompt"])]
    elif suffix in TEXT_SUFFIXES:
        prompts = [line for line in read_texts(path) if line.strip()]
    else:
        raise DataFileError(f"{path}: unsupported prompts file type '{suffix}'; expected one of "
                            f"{TEXT_SUFFIXES + JSONL_SUFFIXES}")
    if not prompts:
        raise DataFileError(f"{path}: holds no prompts")
    return prompts


def find_split_file(directory: str | Path, split: str) -> Optional[Path]:
    """The file for ``split`` in a directory laid out as ``train.jsonl``, ``validation.txt``, ``test.parquet``…"""
    names = {"validation": ("validation", "valid", "val"), "train": ("train",), "test": ("test",)}[split]
    for name in names:
        for suffix in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
            candidate = Path(directory) / f"{name}{suffix}"
            if candidate.exists():
                return candidate
    return None


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file; a byte that is not UTF-8 is a ``DataFileError`` naming its line."""
    return "".join(_utf8_lines(Path(path)))


def _utf8_lines(path: Path):
    """The lines of a text file decoded as UTF-8 one by one, so that a byte that is not UTF-8 names its line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFileError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start} of the "
                                    f"line); re-save the file as UTF-8") from None


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file '{path}' does not exist")
    return path

