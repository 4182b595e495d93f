"""One DataModule for the user's own data: any ``datasets`` source, in any of the ecosystem's formats, for every
module here (see :mod:`lit_distill.data.formats` for the formats and what each task makes of them).

Rows are tokenised once, by ``datasets.map`` (batched, ``num_proc`` processes), into an Arrow file named by the
fingerprint of the source and of the encoder's settings (tokenizer included): a second run, and every DDP rank
after local rank 0 has encoded in ``prepare_data``, reads the encoded rows from that file instead of re-tokenising.
"""

from __future__ import annotations

import glob
import logging
from functools import partial
from collections.abc import Sized
from pathlib import Path
from typing import Callable, Optional

from lit_distill.data.base import SPLITS, EncodedDataModule
from lit_distill.data.chat import resolve_chat_template
from lit_distill.data.collate import SkipLog, collate_preference, collate_sft
from lit_distill.data.formats import (FORMAT_COLUMNS, OUTPUT_COLUMNS, RESERVED_COLUMNS, Encoder, Format, Overlong, Task,
                                      detect_format)
from lit_distill.data.io import DataFileError, read_numbered_jsonl
from lit_distill.data.packing import PackedDataset, best_fit_decreasing, collate_packed, packing_summary
from lit_distill.data.preference import collate_unpaired
from lit_distill.data.prompts import collate_prompts
from lit_distill.data.resume import EncodedStream, StreamingLoader, batches_processed
from lit_distill.models.loading import load_tokenizer

log = logging.getLogger(__name__)

# Rows of each split that ``check_rows`` encodes before any model loads.
CHECKED_ROWS = 16

# Local file suffixes and the ``datasets`` builder that reads them.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def load_source(path: str, name: Optional[str] = None, data_files=None, revision: Optional[str] = None,
                cache_dir: Optional[str] = None, streaming: bool = False):
    """Every split of ``path`` as a ``datasets.DatasetDict`` (``IterableDatasetDict`` when ``streaming``).

    ``path`` is a local ``.json/.jsonl/.parquet/.csv/.arrow`` file or a glob of such files (one ``train`` split), a
    directory written by ``save_to_disk``, a directory of data files (``datasets`` infers the splits from the file
    names), or a hub id (``datasets.load_dataset(path, name, data_files=..., revision=...)``).

    Raises:
        FileNotFoundError: a glob matches nothing.
        DataFileError: a file cannot be read; for JSON lines, the message names ``file:line``.
    """
    import datasets

    local = Path(path).expanduser()
    files = sorted(glob.glob(str(local))) if glob.has_magic(path) else [str(local)] if local.is_file() else []
    if glob.has_magic(path) and not files:
        raise FileNotFoundError(f"path '{path}' matches no file")
    if files:
        suffixes = {Path(file).suffix for file in files}
        if len(suffixes) > 1 or next(iter(suffixes)) not in BUILDERS:
            raise DataFileError(f"path '{path}': expected files of one type among {sorted(BUILDERS)}, got "
                                f"{sorted(suffixes)}")
        builder = BUILDERS[suffixes.pop()]
        try:
            return datasets.load_dataset(builder, data_files={"train": files}, cache_dir=cache_dir,
                                         streaming=streaming)
        except datasets.exceptions.DatasetGenerationError as err:
            raise _file_error(files, builder, err) from None
    if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
        loaded = datasets.load_from_disk(str(local))
        loaded = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        return datasets.IterableDatasetDict({split: rows.to_iterable_dataset(num_shards=len(rows.cache_files) or 1)
                                             for split, rows in loaded.items()}) if streaming else loaded
    if local.is_dir():
        return datasets.load_dataset(str(local), data_files=data_files, cache_dir=cache_dir, streaming=streaming)
    try:
        return datasets.load_dataset(path, name, data_files=data_files, revision=revision, cache_dir=cache_dir,
                                     streaming=streaming)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise FileNotFoundError(f"path '{path}' is neither a local file, glob or directory nor a dataset the hub "
                                f"serves here ({type(err).__name__}: {err})") from None


def _file_error(files: list[str], builder: str, err: Exception) -> DataFileError:
    """The first line a JSON-lines reader rejects, or the reader's own reason."""
    if builder == "json":
        for file in files:
            read_numbered_jsonl(file)  # raises naming file:line for malformed JSON
    cause = err.__cause__ or err
    return DataFileError(f"{', '.join(files[:3])}: cannot be read as {builder} ({type(cause).__name__}: {cause})")


class HFDataModule(EncodedDataModule):
    """The user's dataset, from the hub or local files, in any of the formats of :mod:`lit_distill.data.formats`.

    Splits: training is ``split``; validation is ``validation_split`` if given, else the source's ``validation``
    split if it has one, else the first ``validation_fraction`` of the training rows (the same rows for any seed);
    test is ``test_split`` (none by default).

    The task (what the batches hold) is ``task``, or else the training module's ``data_task`` (SFT and KD: ``sft``;
    DPO and reward models: ``preference``; PPO and GRPO: ``prompts``; the teacher↔student loop: ``questions``).
    Batches are those of the package's other DataModules for that task: ``input_ids``, ``attention_mask``,
    ``labels`` (sft, plus ``position_ids`` when packed); ``{chosen,rejected}_{input_ids,attention_mask,labels}``
    and ``margin`` (preference; KTO's ``{completion,kl}_*`` and ``label`` for unpaired rows, see
    ``data.preference.collate_unpaired``); ``prompt_input_ids``, ``prompt_attention_mask``, ``prompt`` and every other
    column by name (prompts, questions).

    Rows that cannot be used (over-long with ``overlong: skip``, no trained token, an empty prompt, chosen equal
    to rejected) are dropped and counted in one warning per split; truncated rows are counted too. Malformed rows
    (a message without a role, an empty assistant turn, a wrong type) stop the run naming the row.
    """

    def __init__(self, path: str, tokenizer: str = "lit-distill/tokenizer", name: Optional[str] = None,
                 data_files: Optional[dict[str, str | list[str]]] = None, revision: Optional[str] = None,
                 split: str = "train", validation_split: Optional[str] = None, test_split: Optional[str] = None,
                 validation_fraction: float = 0.05, task: Optional[Task] = None, format: Optional[Format] = None,
                 rename_columns: Optional[dict[str, str]] = None, chat_template: Optional[str] = None,
                 max_length: int = 1024, overlong: Overlong = "truncate", assistant_only_loss: bool = True,
                 completion_only_loss: bool = True, packing: bool = False,
                 max_examples: Optional[dict[str, int]] = None, max_truncated_fraction: float = 0.5,
                 batch_size: int = 8,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, num_proc: Optional[int] = None,
                 cache_dir: Optional[str] = None, streaming: bool = False, shuffle_buffer: int = 10_000,
                 seed: int = 0):
        """
        Args:
            path: a hub id, a local ``.json/.jsonl/.parquet/.csv/.arrow`` file or glob, a ``save_to_disk``
                directory or a directory of data files (see :func:`load_source`).
            tokenizer: tokenizer name or path, loaded with ``load_tokenizer``; the trained model's.
            name, data_files, revision: as ``datasets.load_dataset`` takes them (hub ids and data directories).
            task: ``sft``, ``preference``, ``prompts`` or ``questions``; by default the training module's.
            format: force one format instead of detecting it from the columns.
            rename_columns: ``{column in the data: column a format uses}``, applied before detection.
            chat_template: for conversational values: the tokenizer's own when None (an error if it has none),
                ``"default"`` (the tokenizer's own, else the package's), a Jinja file, or ``"none"`` (refuse them).
            max_length: longest example in tokens (longest prompt for the prompts and questions tasks).
            overlong: ``"truncate"`` (prompt-completion pairs lose the prompt's start, texts and conversations their
                end, prompts their start; counted), ``"skip"`` (dropped, counted) or ``"error"``.
            assistant_only_loss: conversations train on assistant turns only (located from the template's
                rendering, see :mod:`lit_distill.data.conversation`); false trains on every token.
            completion_only_loss: prompt-completion pairs train on the completion only.
            packing: pack training examples of the sft task into rows of ``max_length`` (see ``data.packing``).
            max_examples: optional cap per split on the rows read, e.g. ``{"train": 1000, "validation": 64}``.
            max_truncated_fraction: share of a split's rows that ``overlong: truncate`` may cut (counted in a
                warning); more is an error.
            num_proc: processes for tokenising (``datasets.map``).
            cache_dir: where ``datasets`` keeps loaded and encoded Arrow files (default: its own cache).
            streaming: stream the source instead of loading it (corpora larger than memory or disk): rows are
                encoded as they are read, sharded across ranks and DataLoader workers, shuffled in a buffer of
                ``shuffle_buffer`` rows, and the position is saved in checkpoints (see ``data.resume``).
                Without a validation split, the first ``max_examples["validation"]`` rows are held out. Skipped
                and truncated rows are not counted, and packing is not available.
        """
        super().__init__()
        self.save_hyperparameters()
        if overlong not in ("truncate", "skip", "error"):
            raise ValueError(f"overlong must be 'truncate', 'skip' or 'error', got '{overlong}'")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        if packing and task not in (None, "sft"):
            raise ValueError(f"packing applies to the sft task only, got task '{task}'")
        if packing and streaming:
            raise ValueError("packing needs every example's length up front: it cannot be combined with streaming")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.tokenizer = load_tokenizer(tokenizer)
        self.task = task
        self.formats: dict[str, str] = {}  # split -> the format detected (or forced) for it
        self._source = None
        self._encoded: dict = {}  # split -> encoded rows (None: no such split)

    # ---- what to read --------------------------------------------------------------------------------------
    def resolved_task(self) -> str:
        """``task``, else the ``data_task`` of the module the trainer trains."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        task = self.task or getattr(module, "data_task", None)
        if task is None:
            raise ValueError(f"HFDataModule '{self.hparams.path}': set task (sft, preference, prompts or questions); "
                             f"it is only inferred from the LightningModule a Trainer trains"
                             + (f", and {type(module).__name__} has no data_task" if module is not None else ""))
        return task

    def template(self) -> Optional[str]:
        chat_template = self.hparams.chat_template
        if chat_template is None:
            if not self.tokenizer.chat_template:
                raise ValueError(f"tokenizer '{self.hparams.tokenizer}' has no chat template, needed for "
                                 f"conversational data: set chat_template to 'default' (the package's) or a Jinja "
                                 f"file")
            return self.tokenizer.chat_template
        return resolve_chat_template(self.tokenizer, chat_template)

    def source(self):
        """The source's splits (columns renamed), loaded once."""
        if self._source is None:
            hp = self.hparams
            source = load_source(hp.path, hp.name, hp.data_files, hp.revision, hp.cache_dir, hp.streaming)
            if hp.rename_columns:
                columns = _columns(next(iter(source.values())))
                missing = sorted(set(hp.rename_columns) - set(columns))
                if missing:
                    raise ValueError(f"rename_columns names {missing}, not columns of '{hp.path}' ({columns})")
                source = source.rename_columns(hp.rename_columns)
            self._source = source
        return self._source

    def raw_split(self, split: str):
        """The rows of ``split`` before encoding, capped by ``max_examples``, with the name of the source split they
        come from and the index there of the first (validation held out of the training split starts it at 0,
        training after it); None when there is no test split."""
        hp, source = self.hparams, self.source()
        held_out = hp.validation_split is None and "validation" not in source
        first_row = 0
        if split == "test":
            if hp.test_split is None:
                return None
            name = hp.test_split
        elif split == "validation" and not held_out:
            name = hp.validation_split or "validation"
        else:
            name = hp.split
        rows = self._named_split(name, {"train": "split"}.get(split, f"{split}_split"))
        cap = (hp.max_examples or {}).get(split)
        if hp.streaming:
            if held_out and split != "test":
                held = (hp.max_examples or {}).get("validation")
                if held is None:
                    raise ValueError(f"streamed '{hp.path}' has no validation split: give validation_split, or "
                                     f"max_examples.validation (that many first rows are held out)")
                rows, first_row = (rows.take(held), 0) if split == "validation" else (rows.skip(held), held)
            return (rows.take(cap) if cap is not None else rows), name, first_row
        if held_out and split != "test":  # validation is the start of the training split, the same for any seed
            num_validation = int(len(rows) * hp.validation_fraction)
            first_row = 0 if split == "validation" else num_validation
            rows = rows.select(range(num_validation) if split == "validation" else range(num_validation, len(rows)))
        return (rows.select(range(min(cap, len(rows)))) if cap is not None else rows), name, first_row

    def _named_split(self, name: str, argument: str):
        source = self.source()
        if name not in source:
            raise ValueError(f"'{self.hparams.path}' has no split '{name}' ({argument}); its splits are "
                             f"{sorted(source)}")
        return source[name]

    # ---- encoding ------------------------------------------------------------------------------------------
    def encoded(self, split: str):
        """``split`` encoded for the task (read from the cache when it was encoded before), skips dropped; once
        per instance, so that ``setup`` after ``prepare_data`` neither re-reads the cache nor warns again."""
        if split not in self._encoded:
            self._encoded[split] = self._encode(split)
        return self._encoded[split]

    def check_rows(self, task: Optional[str] = None) -> None:
        """The splits exist, their columns match a format of the task, and the first ``CHECKED_ROWS`` rows of each
        encode (a malformed message, a missing template, an over-long row with ``overlong: error``)."""
        task = self.task or task
        if task is None:
            return
        for split in ("train", "validation"):
            rows, source_split, first_row = self.raw_split(split)
            encoder, removed = self._encoder(rows, task, split, source_split, first_row)
            if isinstance(rows, Sized):
                first = rows[:CHECKED_ROWS]
            else:
                streamed = list(rows.take(CHECKED_ROWS))
                first = {column: [row.get(column) for row in streamed] for column in _columns(rows)}
            encoder(first, list(range(len(next(iter(first.values()), [])))))

    def _encoder(self, rows, task: str, split: str, source_split: str, first_row: int) -> tuple[Encoder, list[str]]:
        """The encoder of a split's rows, and the columns it drops."""
        hp = self.hparams
        origin = f"'{hp.path}' split '{source_split}'"
        columns = _columns(rows)
        data_format = self.formats[split] = detect_format(columns, task, hp.format, origin)
        if hp.packing and task != "sft":
            raise ValueError(f"packing applies to the sft task only, and this module's task is '{task}'")
        kept = [] if task in ("sft", "preference") else [column for column in columns
                                                          if column not in OUTPUT_COLUMNS[task]]
        reserved = sorted(set(kept) & set(RESERVED_COLUMNS))
        if reserved:
            raise ValueError(f"{origin}: column name(s) {reserved} are reserved for the batch tensors; rename them")
        template = self.template() if _conversational(rows, data_format) else None
        encoder = Encoder(self.tokenizer, task, data_format, template, hp.max_length, hp.overlong,
                          hp.assistant_only_loss, hp.completion_only_loss, origin, first_row)
        return encoder, [column for column in columns if column not in kept]

    def _encode(self, split: str):
        import datasets
        from datasets.fingerprint import Hasher

        hp = self.hparams
        raw = self.raw_split(split)
        if raw is None:
            return None
        rows, source_split, first_row = raw
        encoder, removed = self._encoder(rows, self.resolved_task(), split, source_split, first_row)
        origin = encoder.origin
        if hp.streaming:  # encoded lazily, as the rows stream in
            return rows.map(encoder, batched=True, with_indices=True, remove_columns=removed).filter(
                _usable, batched=True, input_columns=["skipped"]).remove_columns(["skipped", "truncated"])
        fingerprint = Hasher.hash([rows._fingerprint, encoder])
        cache = Path(hp.cache_dir or datasets.config.HF_DATASETS_CACHE) / "lit_distill" / f"encoded-{fingerprint}.arrow"
        cache.parent.mkdir(parents=True, exist_ok=True)
        encoded = rows.map(encoder, batched=True, with_indices=True, num_proc=hp.num_proc,
                           remove_columns=removed,
                           new_fingerprint=fingerprint, cache_file_name=str(cache),
                           desc=f"tokenising the {split} split")
        self._report(encoded, origin, first_row)
        usable = [index for index, reason in enumerate(encoded["skipped"]) if not reason]
        encoded = encoded.select(usable, keep_in_memory=True).remove_columns(["skipped", "truncated"])
        if split != "test" and not len(encoded):
            raise ValueError(f"{origin} has no usable rows ({len(rows)} read)")
        return encoded

    def _report(self, encoded, origin: str, first_row: int) -> None:
        skips = SkipLog(origin)
        for index, reason in enumerate(encoded["skipped"]):
            if reason:
                skips.add(f"row {first_row + index}", reason)
        skips.report(len(encoded))
        self.report_truncation(origin, sum(encoded["truncated"]), len(encoded), self.hparams.max_length)

    @property
    def unpaired(self) -> Optional[bool]:
        """Whether the training rows are unpaired preference rows (KTO's), once the split's format is known."""
        return self.formats["train"] == "unpaired_preference" if "train" in self.formats else None

    def prepare_data(self) -> None:
        # Local rank 0 encodes (and caches) every split before the other ranks' setup reads the cache.
        if not self.hparams.streaming:
            for split in SPLITS:
                self.encoded(split)

    def build_split(self, split: str):
        hp = self.hparams
        encoded = self.encoded(split)
        if encoded is None:
            return []
        if split != "train" or not hp.packing:
            return encoded
        lengths = [len(ids) for ids in encoded["input_ids"]]
        bins = best_fit_decreasing(lengths, hp.max_length)
        log.info(packing_summary(lengths, bins, hp.max_length, hp.batch_size))
        return PackedDataset(encoded, bins)

    def train_dataloader(self):
        if not self.hparams.streaming:
            return super().train_dataloader()
        from datasets.distributed import split_dataset_by_node

        # Source rows are shuffled and sharded, then encoded one by one, so that the position saved in checkpoints
        # is a count of source rows (see data.resume.EncodedStream).
        hp, trainer = self.hparams, self.trainer
        rows, source_split, first_row = self.raw_split("train")
        encoder, removed = self._encoder(rows, self.resolved_task(), "train", source_split, first_row)
        if hp.shuffle_buffer:
            rows = rows.shuffle(seed=hp.seed, buffer_size=hp.shuffle_buffer)
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        rows = split_dataset_by_node(rows, rank=rank, world_size=world_size)
        return StreamingLoader(EncodedStream(rows, partial(encode_row, encoder, removed)),
                               batches_done=batches_processed(trainer),
                               epoch=lambda: trainer.current_epoch if trainer else 0, batch_size=hp.batch_size,
                               num_workers=hp.num_workers, collate_fn=self.collate_fn("train"))

    def collate_fn(self, split: str) -> Callable[[list[dict]], dict]:
        pad_token_id = self.tokenizer.pad_token_id
        task = self.resolved_task()
        if task == "preference" and self.unpaired:
            return partial(collate_unpaired, pad_token_id=pad_token_id, max_length=self.hparams.max_length)
        if task == "preference":
            return partial(collate_preference, pad_token_id=pad_token_id)
        if task in ("prompts", "questions"):
            return partial(collate_prompts, pad_token_id=pad_token_id)
        if split == "train" and self.hparams.packing:
            return partial(collate_packed, pad_token_id=pad_token_id)
        return partial(collate_sft, pad_token_id=pad_token_id)


def _first_row(rows) -> Optional[dict]:
    if isinstance(rows, Sized):
        return rows[0] if len(rows) else None
    return next(iter(rows), None)


def _columns(rows) -> list[str]:
    """A split's column names; a stream of JSON lines knows them only from its first row."""
    return rows.column_names or list(_first_row(rows) or {})


def _conversational(rows, data_format: str) -> bool:
    """Whether the format's columns hold message lists (Arrow gives a column one type, so the first row tells)."""
    first = _first_row(rows)
    return first is not None and any(isinstance(first.get(column), list) for column in FORMAT_COLUMNS[data_format])


def encode_row(encoder: Encoder, removed: list[str], row: dict, index: int) -> Optional[dict]:
    """One source row as ``datasets.map(encoder, remove_columns=removed)`` would encode it; None when dropped."""
    columns = encoder({column: [value] for column, value in row.items()}, [index])
    if columns.pop("skipped")[0]:
        return None
    columns.pop("truncated")
    return {**{column: value for column, value in row.items() if column not in removed},
            **{column: values[0] for column, values in columns.items()}}


def _usable(reasons: list[str]) -> list[bool]:
    return [not reason for reason in reasons]
