"""Language-modelling data: texts filtered, tokenised and packed into fixed-length blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from lit_distill.data import corpus
from lit_distill.data.base import SPLITS, EncodedDataModule
from lit_distill.data.io import find_split_file, read_texts
from lit_distill.models.loading import load_tokenizer

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


class WikiTextDataModule(EncodedDataModule):
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

    def split_texts(self, split: str) -> list[str]:
        """The raw texts of one split, before filtering."""
        hp = self.hparams
        if hp.source == "embedded":
            count = hp.embedded_documents if split == "train" else max(1, hp.embedded_documents // 10)
            return corpus.text_documents(count, seed=hp.seed + SPLITS.index(split))
        if hp.source == "hub":
            import datasets

            return datasets.load_dataset(hp.hub_name, hp.hub_config, split=split)[hp.text_field]
        path = Path(hp.source).expanduser()
        if path.is_dir():
            split_file = find_split_file(path, split)
            if split_file is None:
                if split == "test":
                    return []
                raise FileNotFoundError(f"data directory '{path}' has no {split} file (train.txt, train.jsonl, ...)")
            return read_texts(split_file, hp.text_field)
        texts = read_texts(path, hp.text_field)
        num_validation = int(len(texts) * hp.validation_fraction)
        return {"train": texts[num_validation:], "validation": texts[:num_validation], "test": []}[split]

    def build_split(self, split: str) -> BlockDataset:
        hp = self.hparams
        texts = [t for t in self.split_texts(split) if keep_line(t, hp.min_chars, hp.drop_headings)]
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
