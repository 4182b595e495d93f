"""A DataLoader over a ``datasets.IterableDataset`` (a corpus streamed, never held in memory) that records its
position for checkpoints.

Lightning saves the ``state_dict`` of a training loader that has one and restores it on resume. The state saved is
the stream's position before the first batch the training loop has not processed yet: the loader notes the
dataset's ``state_dict()`` before fetching each batch and looks up the one the loop's batch count points at, so the
batch Lightning has prefetched is not lost on resume. ``datasets`` restores a stream to a shard and an offset in it;
examples held in a shuffle buffer at that moment are not restored (its documented limit), so a resumed stream is
exact with ``shuffle_buffer: 0`` and continues from the same position with a buffer.

Positions are tracked in the main process: with ``num_workers > 0`` each worker streams its own shards and the
main process cannot see where they are, so such a loader records no position (a warning says so).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class StreamingLoader(DataLoader):
    """``DataLoader(dataset, **kwargs)`` for an iterable ``datasets`` stream, resumable from checkpoints.

    Args:
        dataset: a ``datasets.IterableDataset`` (already sharded for this rank).
        batches_done: the number of this epoch's batches the training loop has processed (read when a checkpoint
            is written, and when an epoch starts: a resumed epoch starts where its checkpoint was).
        epoch: the current epoch, for the stream's shuffle seed.
    """

    def __init__(self, dataset, batches_done: Callable[[], int], epoch: Callable[[], int], **kwargs):
        super().__init__(dataset, **kwargs)
        self.batches_done, self.epoch = batches_done, epoch
        self._positions: dict[int, dict] = {}  # batch index -> the stream's state before that batch
        if self.num_workers:
            log.warning("a streamed dataset read by %d DataLoader workers records no position in checkpoints: a "
                        "resumed run restarts its epoch (num_workers: 0 resumes where it stopped)", self.num_workers)

    def __iter__(self):
        self.dataset.set_epoch(self.epoch())
        index = self.batches_done()
        self._positions = {}
        batches = super().__iter__()
        while True:
            if not self.num_workers:
                self._positions[index] = self.dataset.state_dict()
            try:
                batch = next(batches)
            except StopIteration:
                return
            done = self.batches_done()
            self._positions = {key: value for key, value in self._positions.items() if key >= done}
            index += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self._positions.get(self.batches_done())}

    def load_state_dict(self, state: dict) -> None:
        position: Optional[dict] = state.get("position")
        if position is not None:
            self.dataset.load_state_dict(position)
