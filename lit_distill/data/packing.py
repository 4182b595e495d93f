"""Packing whole examples into rows of at most ``max_length`` tokens, with per-example position ids.

Padding every example of a ragged dataset to the longest of its batch wastes the padded positions' compute;
packing several examples into one row wastes almost none. Each packed example keeps its own position ids
(0, 1, ... restarting at every example), and the model is given them instead of an attention mask
(``models.heads.attention_inputs``): transformers then masks attention block-diagonally, so no token attends to
another example. The first token of each example gets no label, because in a packed row it would be predicted from
the previous example's last token, whereas unpacked it is never predicted. With both, a packed batch gives
the same per-token losses as its examples unpacked (``tests/test_packing.py``).

Shapes: B rows, T tokens.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Sequence

import torch
from torch.utils.data import Dataset

from lit_distill.data.collate import IGNORE_INDEX, collate_sft, pad_right


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into bins of at most ``capacity`` tokens, by best-fit decreasing.

    Each example, longest first, goes into the open bin it fills best: the one with the least room left that still
    fits it, or a new bin: at most 11/9 of the optimal number of bins, plus one, in O(n log n) bisections
    (and list insertions). Ties keep the dataset order, so the bins are a pure function of the lengths.

    Raises:
        ValueError: an example is longer than ``capacity`` (truncate or split it first).
    """
    too_long = next((index for index, length in enumerate(lengths) if length > capacity), None)
    if too_long is not None:
        raise ValueError(f"example {too_long} has {lengths[too_long]} tokens, more than the packing capacity "
                         f"{capacity}")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, bin index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        slot = bisect_left(room, (length, -1))  # the bin with the least room that still fits
        if slot == len(room):
            bins.append([index])
            free, bin_index = capacity - length, len(bins) - 1
        else:
            free, bin_index = room.pop(slot)
            bins[bin_index].append(index)
            free -= length
        if free > 0:
            insort(room, (free, bin_index))
    return bins


class PackedDataset(Dataset):
    """Rows of packed examples: row ``r`` concatenates the examples ``bins[r]`` of ``examples`` (dicts with
    ``input_ids`` and ``labels`` lists), read lazily.

    A row is ``input_ids``, ``labels`` (each example's first label set to -100) and ``position_ids`` (restarting
    at 0 for each example).
    """

    def __init__(self, examples: Sequence[dict], bins: list[list[int]]):
        self.examples, self.bins = examples, bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, row: int) -> dict[str, list[int]]:
        input_ids, labels, position_ids = [], [], []
        for index in self.bins[row]:
            example = self.examples[index]
            input_ids += example["input_ids"]
            labels += [IGNORE_INDEX] + list(example["labels"][1:])
            position_ids += range(len(example["input_ids"]))
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_packed(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch packed rows: ``collate_sft``'s ``input_ids``, ``attention_mask`` (1 on real tokens; the model does not
    get it, see the module docstring) and ``labels``, plus ``position_ids`` (B, T), the right padding numbered on
    from 0 as one more (unlabelled) example."""
    batch = collate_sft(rows, pad_token_id)
    length = batch["input_ids"].shape[1]
    batch["position_ids"] = pad_right([row["position_ids"] + list(range(length - len(row["position_ids"])))
                                       for row in rows], 0, length)
    return batch


def packing_summary(lengths: Sequence[int], bins: list[list[int]], capacity: int, batch_size: int) -> str:
    """One line on what packing saved: token slots of padded batches (in dataset order) against packed rows."""
    def token_slots(row_lengths: Sequence[int]) -> int:  # batches padded to their longest row
        return sum(batch_size * max(row_lengths[start:start + batch_size])
                   for start in range(0, len(row_lengths), batch_size))

    padded, packed = token_slots(lengths), token_slots([sum(lengths[index] for index in row) for row in bins])
    real = sum(lengths)
    return (f"packed {len(lengths)} examples ({real:,} tokens) into {len(bins)} rows of at most {capacity}: "
            f"{packed:,} token slots in batches of {batch_size} ({real / max(packed, 1):.0%} real), against "
            f"{padded:,} padded unpacked ({real / max(padded, 1):.0%} real)")
