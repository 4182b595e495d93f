"""Language-modelling data: texts filtered, tokenised and packed into fixed-length blocks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch.utils.data import Dataset

from lit_distill.data import corpus
from lit_distill.data.base import SPLITS, EncodedDataModule
from lit_distill.data.collate import holdout
from lit_distill.data.io import (JSONL_SUFFIXES, PARQUET_SUFFIXES, DataFileError, find_split_file,
                                 read_numbered_jsonl, read_texts)
from lit_distill.models.loading import load_tokenizer

if TYPE_CHECKING:
    import datasets

Row = tuple[str, dict]  # (where: "file:line", "file: row N" or "hub split row N"; the row)
# Keys of a dict turn, in the formats DialogDataModule reads: OpenAI/HF chat messages and ShareGPT.
TURN_TEXT_KEYS = ("content", "value")
TURN_SPEAKER_KEYS = ("role", "from")


def keep_line(text: str, min_chars: int, drop_headings: bool) -> bool:
    """WikiText filter: drop empty/short lines and, optionally, ``= Heading =`` lines."""
    stripped = text.strip()
    if len(stripped) < min_chars:
        return False
    return not (drop_headings and stripped.startswith("=") and stripped.endswith("="))


def pack(token_ids: list[list[int]], block_size: int, separator_id: int) -> torch.Tensor:
    """Concatenate documents (each followed by ``separator_id``) and cut into (num_blocks, block_size); the tail
    shorter than a block is dropped."""
    stream = [token for ids in token_ids for token in (*ids, separator_id)]
    num_blocks = len(stream) // block_size
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


class BlockDataset(Dataset):
    """Fixed-length blocks of token ids; every position is a real token, so labels == input_ids."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks  # (num_blocks, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class PackedTextDataModule(EncodedDataModule):
    """Language modelling on texts from one of four sources, filtered, tokenised and packed into blocks; the shared
    machinery of :class:`WikiTextDataModule`, :class:`DialogDataModule` and :class:`BilingualDataModule`.

    ``source`` picks where texts come from:
      * ``"embedded"``: :meth:`embedded_texts` (offline; train/validation/test use different seeds);
      * ``"hub"``: ``datasets.load_dataset(hub_name, hub_config, split=split)``, read by :meth:`hub_texts`;
      * a directory holding ``train.*``/``validation.*``/``test.*``, each read by :meth:`file_texts`;
      * a single file: split into train/validation by ``validation_fraction``.

    Subclasses implement the three readers and, in ``__init__``, load ``self.tokenizer`` and save as hparams
    ``source``, ``block_size``, ``min_chars``, ``hub_name``, ``hub_config``, ``validation_fraction``,
    ``embedded_documents``, ``max_blocks`` and those :class:`EncodedDataModule` expects.
    """

    def split_texts(self, split: str) -> list[str]:
        """The raw texts of one split, before filtering."""
        hp = self.hparams
        if hp.source == "embedded":
            count = hp.embedded_documents if split == "train" else max(1, hp.embedded_documents // 10)
            return self.embedded_texts(count, seed=hp.seed + SPLITS.index(split))
        if hp.source == "hub":
            import datasets

            return self.hub_texts(datasets.load_dataset(hp.hub_name, hp.hub_config, split=split), split)
        path = Path(hp.source).expanduser()
        if path.is_dir():
            split_file = find_split_file(path, split)
            if split_file is None:
                if split == "test":
                    return []
                raise FileNotFoundError(f"data directory '{path}' has no {split} file (train.txt, train.jsonl, ...)")
            return self.file_texts(split_file)
        return holdout(self.file_texts(path), split, hp.validation_fraction)

    def embedded_texts(self, count: int, seed: int) -> list[str]:
        """``count`` texts generated from ``seed``."""
        raise NotImplementedError

    def file_texts(self, path: Path) -> list[str]:
        """The texts of one local file."""
        raise NotImplementedError

    def hub_texts(self, dataset: datasets.Dataset, split: str) -> list[str]:
        """The texts of one split of a hub dataset."""
        raise NotImplementedError

    def keep_text(self, text: str) -> bool:
        """Whether a text is kept for packing: at least ``min_chars`` characters after stripping."""
        return keep_line(text, self.hparams.min_chars, drop_headings=False)

    def build_split(self, split: str) -> BlockDataset:
        hp = self.hparams
        texts = [t for t in self.split_texts(split) if self.keep_text(t)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        blocks = pack(ids, hp.block_size, self.tokenizer.eos_token_id)
        cap = (hp.max_blocks or {}).get(split)
        if cap is not None:
            blocks = blocks[:cap]
        if split != "test" and len(blocks) == 0:
            raise ValueError(f"{split} split of source '{hp.source}' is empty after filtering lines shorter than "
                             f"{hp.min_chars} characters and packing into blocks of {hp.block_size} tokens "
                             f"({len(texts)} lines kept)")
        return BlockDataset(blocks)


class WikiTextDataModule(PackedTextDataModule):
    """WikiText-2 language modelling, or the same shape from local files or the embedded corpus.

    ``source`` picks where texts come from:
      * ``"embedded"``: the package's synthetic corpus (offline; train/validation/test use different seeds);
      * ``"hub"``: ``datasets.load_dataset(hub_name, hub_config)`` (default WikiText-2 raw);
      * a directory holding ``train.*``/``validation.*``/``test.*`` (.txt, .jsonl, .parquet);
      * a single file: split into train/validation by ``validation_fraction``.
    """

    def __init__(self, source: str = "embedded", tokenizer: str = "lit-distill/tokenizer", block_size: int = 128,
                 batch_size: int = 8, eval_batch_size: Optional[int] = None, text_field: str = "text",
                 min_chars: int = 20, drop_headings: bool = True, hub_name: str = "wikitext",
                 hub_config: str = "wikitext-2-raw-v1", validation_fraction: float = 0.05,
                 embedded_documents: int = 4000, max_blocks: Optional[dict[str, int]] = None,
                 num_workers: int = 0, seed: int = 0):
        """
        Args:
            block_size: tokens per training example after packing.
            min_chars: lines shorter than this (after stripping) are dropped.
            drop_headings: drop WikiText ``= Heading =`` lines.
            embedded_documents: number of training documents generated for ``source="embedded"``
                (validation and test get a tenth each).
            max_blocks: optional cap per split, e.g. ``{"validation": 64}``, for quick runs.
        """
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)

    def embedded_texts(self, count: int, seed: int) -> list[str]:
        return corpus.text_documents(count, seed=seed)

    def file_texts(self, path: Path) -> list[str]:
        return read_texts(path, self.hparams.text_field)

    def hub_texts(self, dataset: datasets.Dataset, split: str) -> list[str]:
        return dataset[self.hparams.text_field]

    def keep_text(self, text: str) -> bool:
        return keep_line(text, self.hparams.min_chars, self.hparams.drop_headings)

def read_rows(path: Path) -> list[Row]:
    """Every row of a JSONL (``.jsonl``/``.json``, one object per line) or parquet file, with where it is."""
    if path.suffix in JSONL_SUFFIXES:
        return [(f"{path}:{number}", row) for number, row in read_numbered_jsonl(path)]
    if path.suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        return [(f"{path}: row {index}", row) for index, row in enumerate(pq.read_table(path).to_pylist())]
    raise DataFileError(f"{path}: unsupported file type '{path.suffix}'; expected one of "
                        f"{JSONL_SUFFIXES + PARQUET_SUFFIXES} with one structured row per line")


class RowTextDataModule(PackedTextDataModule):
    """Language modelling on texts rendered one per structured row (a dialog, a translation pair) by
    :meth:`row_text`, from the sources of :class:`PackedTextDataModule` (files: .jsonl/.json/.parquet only)."""

    def row_text(self, row: dict, where: str) -> str:
        """The text of one row; raises :class:`DataFileError` naming ``where`` and the field if it is malformed."""
        raise NotImplementedError

    def file_texts(self, path: Path) -> list[str]:
        return [self.row_text(row, where) for where, row in read_rows(path)]

    def hub_texts(self, dataset: datasets.Dataset, split: str) -> list[str]:
        return [self.row_text(row, f"{self.hparams.hub_name} {split} row {index}") for index, row in enumerate(dataset)]


def split_turn(turn: str | dict, where: str) -> tuple[Optional[str], str]:
    """``(speaker or None, text)`` of a turn: a string, or a dict with the text under one of
    :data:`TURN_TEXT_KEYS` and optionally the speaker under one of :data:`TURN_SPEAKER_KEYS`."""
    if isinstance(turn, str):
        return None, turn
    if isinstance(turn, dict):
        text = next((turn[key] for key in TURN_TEXT_KEYS if key in turn), None)
        speaker = next((turn[key] for key in TURN_SPEAKER_KEYS if key in turn), None)
        if isinstance(text, str) and (speaker is None or isinstance(speaker, str)):
            return speaker, text
    raise DataFileError(f"{where}: expected a string or an object with a string {' or '.join(TURN_TEXT_KEYS)} "
                        f"(speaker, optional, in {' or '.join(TURN_SPEAKER_KEYS)}), got {turn!r:.80}")


class DialogDataModule(RowTextDataModule):
    """Language modelling on dialogs: each row's turns are concatenated into one document, packed like WikiText.

    A row holds its turns under ``text_field`` as a list of
      * strings (DailyDialog: ``{"dialog": ["Hi .", "Hello !"]}``), speakers taken in turn from ``speakers``; or
      * objects with the text in ``content`` and the speaker in ``role`` (OpenAI/HF chat,
        ``{"messages": [{"role": "user", "content": "Hi"}, ...]}``), or the text in ``value`` and the speaker in
        ``from`` (ShareGPT, ``{"conversations": [{"from": "human", "value": "Hi"}, ...]}``); the speaker is used
        verbatim and, if missing, taken from ``speakers`` as for a string turn.

    Each turn is stripped of surrounding whitespace, written as ``turn_format`` and the turns are joined by
    ``turn_separator``; with the defaults ``["Hi .", "Hello !"]`` becomes ``"A: Hi .\nB: Hello !"``.

    ``source`` as in :class:`WikiTextDataModule`, files being .jsonl/.json/.parquet; ``"embedded"`` is
    :func:`~lit_distill.data.corpus.dialogs` (a customer asks about a person, an assistant answers; customer
    first); ``"hub"`` defaults to ``OpenRL/daily_dialog``, a parquet copy of DailyDialog (Li et al., 2017;
    13k dialogs, train/validation/test, turns under ``dialog``).
    """

    def __init__(self, source: str = "embedded", tokenizer: str = "lit-distill/tokenizer", block_size: int = 128,
                 batch_size: int = 8, eval_batch_size: Optional[int] = None, text_field: str = "dialog",
                 speakers: Sequence[str] = ("A", "B"), turn_format: str = "{speaker}: {text}",
                 turn_separator: str = "\n", min_chars: int = 1, hub_name: str = "OpenRL/daily_dialog",
                 hub_config: Optional[str] = None, validation_fraction: float = 0.05,
                 embedded_documents: int = 4000, max_blocks: Optional[dict[str, int]] = None,
                 num_workers: int = 0, seed: int = 0):
        """
        Args:
            text_field: the row field holding the list of turns (``"messages"`` for chat, ``"conversations"`` for
                ShareGPT files).
            speakers: speaker names given in turn to turns without one (string turns).
            turn_format: how one turn is written, with the fields ``{speaker}`` and ``{text}``; ``"{text}"`` drops
                the speaker.
            turn_separator: put between consecutive turns of a dialog (dialogs are separated by EOS).
            min_chars: dialogs shorter than this are dropped.
            embedded_documents: number of training dialogs for ``source="embedded"`` (validation and test get a
                tenth each).

        Other arguments as in :class:`WikiTextDataModule`.
        """
        if not speakers:
            raise ValueError("speakers must name at least one speaker")
        try:
            turn_format.format(speaker="", text="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"turn_format '{turn_format}' may only use the fields {{speaker}} and {{text}} "
                             f"({err!r})") from None
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)

    def dialog_text(self, turns: list, where: str) -> str:
        """One document from a dialog's turns (see the class docstring)."""
        hp = self.hparams
        if not isinstance(turns, list) or not turns:
            raise DataFileError(f"{where}: expected a non-empty list of turns, got {turns!r:.80}")
        lines = []
        for index, turn in enumerate(turns):
            speaker, text = split_turn(turn, f"{where}, turn {index}")
            speaker = hp.speakers[index % len(hp.speakers)] if speaker is None else speaker
            lines.append(hp.turn_format.format(speaker=speaker, text=text.strip()))
        return hp.turn_separator.join(lines)

    def row_text(self, row: dict, where: str) -> str:
        field = self.hparams.text_field
        if field not in row:
            raise DataFileError(f"{where}: missing field '{field}' (the list of turns); the row has {sorted(row)}")
        return self.dialog_text(row[field], f"{where}: field '{field}'")

    def embedded_texts(self, count: int, seed: int) -> list[str]:
        return [self.dialog_text(turns, f"embedded dialog {index}")
                for index, turns in enumerate(corpus.dialogs(count, seed=seed))]


class BilingualDataModule(RowTextDataModule):
    """Language modelling on one language of a parallel corpus: each row is a translation pair and the text in
    ``language`` becomes one document, packed like WikiText.

    A row is either
      * nested (WMT/OPUS): ``{"translation": {"de": "Hallo .", "en": "Hello ."}}`` (the field is ``text_field``), or
      * flat: ``{"de": "Hallo .", "en": "Hello ."}``, one field per language code (other fields are ignored).

    A row without a string under ``language`` is an error naming its file:line and the languages it has.

    ``source`` as in :class:`WikiTextDataModule`, files being .jsonl/.json/.parquet; ``"embedded"`` is
    :func:`~lit_distill.data.corpus.bilingual_pairs`, English (``"en"``) paired with a synthetic letter-substitution
    language (``"xx"``, :func:`~lit_distill.data.corpus.to_synthetic_language`; about 3.4 times as many tokens per
    character as English under the shipped tokenizer); ``"hub"`` defaults to ``wmt/wmt16`` ``de-en`` (parquet,
    4.5M train pairs, an 830 MB download; languages ``de`` and ``en``; smaller parallel corpora in the same shape
    include ``wmt/wmt16`` ``tr-en``).
    """

    def __init__(self, language: str, source: str = "embedded", tokenizer: str = "lit-distill/tokenizer",
                 block_size: int = 128, batch_size: int = 8, eval_batch_size: Optional[int] = None,
                 text_field: str = "translation", min_chars: int = 1, hub_name: str = "wmt/wmt16",
                 hub_config: Optional[str] = "de-en", validation_fraction: float = 0.05,
                 embedded_documents: int = 4000, max_blocks: Optional[dict[str, int]] = None,
                 num_workers: int = 0, seed: int = 0):
        """
        Args:
            language: the language code whose side of each pair is kept, e.g. ``"de"``; the embedded pairs have
                ``"en"`` and ``"xx"``.
            text_field: the row field holding the ``{language: text}`` pair; rows without it are read as flat.
            min_chars: texts shorter than this are dropped.
            embedded_documents: number of training pairs for ``source="embedded"`` (validation and test get a
                tenth each).

        Other arguments as in :class:`WikiTextDataModule`.
        """
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)

    def pair_text(self, pair: dict, where: str) -> str:
        """The ``language`` side of a ``{language: text}`` pair."""
        language = self.hparams.language
        # None is absent too: a hub/parquet struct column gives every row all languages of the dataset.
        if pair.get(language) is None:
            present = sorted(code for code, text in pair.items() if text is not None)
            raise DataFileError(f"{where}: no '{language}' text; the languages present are {present}")
        if not isinstance(pair[language], str):
            raise DataFileError(f"{where}: field '{language}' must be a string, got {type(pair[language]).__name__}")
        return pair[language]

    def row_text(self, row: dict, where: str) -> str:
        field = self.hparams.text_field
        if field not in row:  # a flat row: one field per language
            return self.pair_text(row, where)
        if not isinstance(row[field], dict):
            raise DataFileError(f"{where}: field '{field}' must be an object {{language: text}}, "
                                f"got {type(row[field]).__name__}")
        return self.pair_text(row[field], f"{where}: field '{field}'")

    def embedded_texts(self, count: int, seed: int) -> list[str]:
        return [self.pair_text(pair, f"embedded pair {index}")
                for index, pair in enumerate(corpus.bilingual_pairs(count, seed=seed))]
