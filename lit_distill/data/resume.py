"""Training DataLoaders that resume mid-epoch exactly where a checkpoint was written.

Lightning saves the ``state_dict`` of a training loader that has one (its stateful-dataloader protocol) and hands it
back to ``load_state_dict`` on resume, before the epoch's batches are drawn. Both loaders here save the position of
the first batch the training loop has not processed: the loop's own count (``batch_progress.current.processed``,
read when the checkpoint is written), not the number of batches fetched, which is ahead of it by whatever Lightning
and the DataLoader workers have prefetched. This protocol rather than torchdata's ``StatefulDataLoader``: no extra
dependency, and since the map-style samplers here are pure functions of ``(seed, epoch)``, the whole state is two
integers, exact with any number of workers.

* :class:`ResumableLoader` (map-style datasets): on load, its :class:`ResumableSampler` leaves out the indices of
  the batches already processed in that epoch (the curriculum's sampler restores its draws instead).
* :class:`StreamingLoader` (a ``datasets.IterableDataset``, a corpus streamed, never held in memory): the state is
  the number of source rows the :class:`EncodedStream` had read (used or dropped) before each batch. On resume the
  stream is replayed from the epoch's start and that many rows are skipped unencoded: ``datasets`` restores its own
  ``state_dict`` to a shard and offset but not the contents of a shuffle buffer (its documented limit), and the
  replay refills the buffer exactly, at the cost of reading (not tokenising) the rows before the position.
  Positions are tracked in the main process: with ``num_workers > 0`` each worker streams its own shards and the
  main process cannot see where they are, so such a loader records no position (a warning says so). Under DDP
  every rank's position is saved, and each rank resumes its own (the same number of ranks is needed).
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Optional

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

log = logging.getLogger(__name__)


def batches_processed(trainer) -> Callable[[], int]:
    """A function giving how many of the current epoch's training batches ``trainer`` has processed (0 without
    one)."""
    return lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (its order a function of ``seed`` and the epoch) that can start an epoch part-way:
    after ``load_state(state_at(k))``, iterating that epoch leaves out the indices of its first ``k`` batches (once).
    """

    def __init__(self, dataset, batch_size: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size = batch_size
        self._skip: Optional[tuple[int, int]] = None  # (epoch, indices to leave out)

    def state_at(self, batches_done: int) -> dict:
        return {"epoch": self.epoch, "batches_done": batches_done}

    def load_state(self, state: dict) -> None:
        self._skip = (state["epoch"], state["batches_done"] * self.batch_size)

    def __iter__(self):
        indices = list(super().__iter__())
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1]:]
        self._skip = None
        return iter(indices)


class ResumableLoader(DataLoader):
    """``DataLoader(dataset, sampler=sampler, **kwargs)`` whose state is its sampler's position at the first batch the
    training loop has not processed (a sampler with ``state_at(batches_done)`` and ``load_state(state)``, such as
    :class:`ResumableSampler` or the curriculum's)."""

    def __init__(self, dataset, sampler, batches_done: Callable[[], int], **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict:
        return self.sampler.state_at(self.batches_done())

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state(state)


class EncodedStream(IterableDataset):
    """The usable examples of a stream of source rows: ``encode(row, index)`` gives an example or None (a row
    dropped), and ``rows_read`` counts the rows read so far in the epoch, used or dropped."""

    def __init__(self, rows, encode: Callable[[dict, int], Optional[dict]]):
        self.rows, self.encode = rows, encode
        self.start = self.rows_read = 0

    def restart(self, epoch: int, start: int) -> None:
        """The next iteration reads the epoch's rows from row ``start`` on."""
        self.rows.set_epoch(epoch)
        self.start = self.rows_read = start

    def __iter__(self):
        # Not datasets' skip(): on a stream split by node it skips rows of the whole stream, before the split.
        for index, row in enumerate(itertools.islice(self.rows, self.start, None), self.start):
            self.rows_read = index + 1
            example = self.encode(row, index)
            if example is not None:
                yield example


class StreamingLoader(DataLoader):
    """``DataLoader(stream, **kwargs)`` over an :class:`EncodedStream`, resumable from checkpoints.

    Args:
        stream: the examples of this rank's share of the source rows.
        batches_done: the number of this epoch's batches the training loop has processed (read when a checkpoint
            is written, and when an epoch starts: a resumed epoch starts where its checkpoint was).
        epoch: the current epoch, for the stream's shuffle seed.
    """

    def __init__(self, stream: EncodedStream, batches_done: Callable[[], int], epoch: Callable[[], int], **kwargs):
        super().__init__(stream, **kwargs)
        self.batches_done, self.epoch = batches_done, epoch
        self._positions: dict[int, int] = {}  # batch index -> source rows read before that batch
        self._resume_at = 0
        if self.num_workers:
            log.warning("a streamed dataset read by %d DataLoader workers records no position in checkpoints: a "
                        "resumed run restarts its epoch (num_workers: 0 resumes where it stopped)", self.num_workers)

    def __iter__(self):
        if self._resume_at:
            log.info("skipping the %d rows of the stream read before the checkpoint", self._resume_at)
        self.dataset.restart(self.epoch(), self._resume_at)
        self._resume_at = 0
        index = self.batches_done()
        self._positions = {}
        batches = super().__iter__()
        while True:
            if not self.num_workers:
                self._positions[index] = self.dataset.rows_read
            try:
                batch = next(batches)
            except StopIteration:
                return
            done = self.batches_done()
            self._positions = {key: value for key, value in self._positions.items() if key >= done}
            index += 1
            yield batch

    def state_dict(self) -> dict:
        # Each rank streams its own shards, and Lightning saves one loader state (rank 0's): gather every rank's
        # position (a collective: Lightning builds the checkpoint on every rank), each rank loads its own.
        position = self._positions.get(self.batches_done())
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {"rows_read": [position]}
        positions = [None] * dist.get_world_size()
        dist.all_gather_object(positions, position)
        return {"rows_read": positions}

    def load_state_dict(self, state: dict) -> None:
        positions = state.get("rows_read") or [None]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if len(positions) != (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1):
            log.warning("the checkpoint's stream positions are of %d ranks, this run has another number: the "
                        "stream restarts its epoch", len(positions))
        elif positions[rank] is not None:
            self._resume_at = positions[rank]
