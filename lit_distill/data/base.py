"""The DataModule plumbing every dataset here shares: per-split datasets built once, seeded loaders."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

SPLITS = ("train", "validation", "test")


class EncodedDataModule(L.LightningDataModule):
    """Serves per-split datasets of encoded examples: subclasses implement ``build_split`` and, unless torch's
    default collation fits, ``collate_fn``.

    Expects ``batch_size``, ``eval_batch_size``, ``num_workers`` and ``seed`` among the subclass's hparams.
    """

    def __init__(self):
        super().__init__()
        self.datasets: dict[str, Sequence[dict]] = {}

    def build_split(self, split: str) -> Sequence[dict]:
        """The encoded examples of ``split`` (one of :data:`SPLITS`)."""
        raise NotImplementedError

    def collate_fn(self, split: str) -> Optional[Callable[[list[dict]], dict]]:
        """The DataLoader ``collate_fn`` of ``split`` (a picklable callable, for worker processes); None is torch's
        default collation."""
        return None

    def setup(self, stage: Optional[str] = None) -> None:
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                  "predict": ("validation",)}.get(stage, SPLITS)
        for split in wanted:
            if split not in self.datasets:
                self.datasets[split] = self.build_split(split)

    def _loader(self, split: str, sampler: Optional[DistributedSampler] = None) -> DataLoader:
        hp = self.hparams
        batch_size = hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)
        return DataLoader(self.datasets[split], batch_size=batch_size, sampler=sampler, num_workers=hp.num_workers,
                          collate_fn=self.collate_fn(split))

    def train_dataloader(self) -> DataLoader:
        # The shuffle order is a function of (seed, epoch) only (Lightning calls set_epoch), so a run resumed
        # from an epoch-end checkpoint sees the same batches as an uninterrupted one, on any number of ranks.
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = DistributedSampler(self.datasets["train"], num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=self.hparams.seed)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("validation")
