"""The DataModule plumbing every dataset here shares: per-split datasets built once, seeded loaders."""

from __future__ import annotations

import contextvars
import inspect
import logging
from typing import Callable, Optional, Sequence

import lightning as L
from torch.utils.data import DataLoader

from lit_distill.data.resume import ResumableLoader, ResumableSampler, batches_processed

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


class EncodedDataModule(L.LightningDataModule):
    """Serves per-split datasets of encoded examples: subclasses implement ``build_split`` and, unless torch's
    default collation fits, ``collate_fn``.

    Expects ``batch_size``, ``eval_batch_size``, ``num_workers`` and ``seed`` among the subclass's hparams.
    """

    def __init__(self):
        super().__init__()
        self.datasets: dict[str, Sequence[dict]] = {}

    def save_hyperparameters(self, *args, ignore=None, frame=None, logger: bool = True) -> None:
        """Lightning's, always from this DataModule's own constructor arguments.

        While LightningCLI instantiates the configured DataModule it passes that config to ``save_hyperparameters``
        through a context variable, and it does so for every DataModule in the config: the datasets of a
        :class:`~lit_distill.data.CurriculumDataModule` would record their parent's config as theirs. In an empty
        ``contextvars.Context`` Lightning reads the calling constructors' arguments instead (for the configured
        DataModule, the same values)."""
        frame = frame or inspect.currentframe().f_back
        contextvars.Context().run(super().save_hyperparameters, *args, ignore=ignore, frame=frame, logger=logger)

    def build_split(self, split: str) -> Sequence[dict]:
        """The encoded examples of ``split`` (one of :data:`SPLITS`)."""
        raise NotImplementedError

    def check_rows(self, task: Optional[str] = None) -> None:
        """Read the source as far as needed to find the mistakes no model is needed for (a missing file, a
        malformed line, columns no format matches), raising as ``build_split`` would; nothing is kept. The CLI
        calls it before any weights load. ``task`` is the ``data_task`` of the module to be trained. The default
        reads nothing: a DataModule whose source is cheap to read overrides it."""

    def report_truncation(self, origin: str, truncated: int, total: int, max_length: int) -> None:
        """Warn that ``truncated`` of ``total`` examples of ``origin`` were cut to ``max_length`` tokens; past the
        ``max_truncated_fraction`` hyperparameter (default 0.5), refuse: the data does not fit the setting."""
        if not truncated:
            return
        limit = self.hparams.get("max_truncated_fraction", 0.5)
        message = f"{truncated} of {total} examples of the {origin} were truncated to max_length={max_length}"
        if truncated > limit * total:
            raise ValueError(f"{message}, more than max_truncated_fraction={limit}: raise max_length, or "
                             f"max_truncated_fraction to train on them as cut")
        log.warning(message)

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

    def _evaluation_loader(self, split: str) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.datasets[split], batch_size=hp.eval_batch_size or hp.batch_size,
                          num_workers=hp.num_workers, collate_fn=self.collate_fn(split))

    def train_dataloader(self) -> DataLoader:
        # The shuffle order is a function of (seed, epoch) only (Lightning calls set_epoch), and the loader saves how
        # many batches of the epoch were processed, so a run resumed from any checkpoint, mid-epoch too, sees the
        # same batches as an uninterrupted one, on any number of ranks.
        hp = self.hparams
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ResumableSampler(self.datasets["train"], hp.batch_size, num_replicas=world_size, rank=rank,
                                   shuffle=True, seed=hp.seed)
        return ResumableLoader(self.datasets["train"], sampler, batches_processed(self.trainer),
                               batch_size=hp.batch_size, num_workers=hp.num_workers,
                               collate_fn=self.collate_fn("train"))

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader("validation")
