"""An adaptive mixture of several datasets: the weight update rule, the sampler and the DataModule.

Every training batch comes from one dataset, drawn with probability equal to its current weight (batch-level
mixing: each dataset keeps its own collation — packed text blocks, padded QA pairs, left-padded prompts — and
its own columns, which reward functions read). The weights are moved by :func:`curriculum_update` from
difficulties that :class:`~lit_distill.callbacks.Autocurriculum` measures with a rolling frozen copy of the model.

DDP: every rank draws the dataset of a step from the same generator, seeded by ``(seed, epoch)``, with the same
weights (kept identical by the callback), and takes its own shard of that dataset's shuffled examples.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from lit_distill.data.base import EncodedDataModule
from lit_distill.data.resume import ResumableLoader, batches_processed
from lit_distill.rollout import seeded_generator


class CurriculumState(NamedTuple):
    """What the update rule carries from one update to the next: D datasets."""

    weights: Tensor  # (D,) sampling probabilities, sum 1, each >= the minimum weight
    velocity: Tensor  # (D,) heavy-ball velocity of the weights


def apply_floor(weights: Tensor, min_weight: float) -> Tensor:
    """The distribution closest in shape to ``weights`` with every entry >= ``min_weight``: entries below the floor
    are raised to it and the mass they take is removed from the others in proportion to their weight. A no-op on
    weights that already respect the floor.

    Args:
        weights: (D,) non-negative, summing to 1.
        min_weight: the floor, with ``D * min_weight <= 1``.
    """
    floored = torch.zeros_like(weights, dtype=torch.bool)
    while True:
        low = floored | (weights < min_weight)
        free_mass = 1.0 - min_weight * int(low.sum())
        rest = weights.masked_fill(low, 0.0)
        total = rest.sum()
        if total > 0:
            rest = rest * (free_mass / total)
        else:  # nothing above the floor left to scale: spread the free mass evenly over the free entries
            rest = (~low).to(weights.dtype) * free_mass / max(int((~low).sum()), 1)
        weights = torch.where(low, torch.full_like(weights, min_weight), rest)
        if torch.equal(low, floored):
            return weights
        floored = low


def curriculum_update(state: CurriculumState, difficulty: Tensor, variance: Tensor, *, lr: float,
                      momentum: float = 0.9, variance_weight: float = 0.5, min_weight: float = 0.05) -> CurriculumState:
    """One step of the mixture weights towards the datasets the model currently finds hardest.

    The combined metric is the mixture's expected difficulty ``J(w) = Σ_i w_i s_i`` with per-dataset score
    ``s_i = μ_i + λ σ²_i`` (mean loss plus ``variance_weight`` times its variance under the frozen snapshot). Its
    gradient ``∂J/∂w = s``, projected onto the simplex's tangent space (``g = s − mean(s)``, so the step keeps
    ``Σ w = 1``), drives heavy-ball (second-order) dynamics::

        v ← β v + η g          w ← max(w + v, 0) / Σ max(w + v, 0)          w ← floor(w, w_min)

    Where the floor stops a weight, its outward velocity is zeroed (an inelastic wall), so a starved dataset does
    not build up momentum it would have to unwind before it can recover.

    Args:
        state: current weights and velocity, each (D,).
        difficulty: (D,) mean loss μ per dataset.
        variance: (D,) variance σ² of the per-example loss per dataset.
        lr: step size η, in weight per unit of score (nats).
        momentum: β in [0, 1).
        variance_weight: λ >= 0.
        min_weight: the floor of every weight, ``0 <= min_weight <= 1 / D``.

    Returns:
        The new state; weights sum to 1 and are >= ``min_weight``.
    """
    count = state.weights.numel()
    if not 0.0 <= min_weight <= 1.0 / count:
        raise ValueError(f"min_weight must be in [0, 1/{count}] for {count} datasets, got {min_weight}")
    if not 0.0 <= momentum < 1.0 or lr < 0 or variance_weight < 0:
        raise ValueError(f"need 0 <= momentum < 1, lr >= 0 and variance_weight >= 0; got momentum={momentum}, "
                         f"lr={lr}, variance_weight={variance_weight}")
    score = difficulty + variance_weight * variance  # (D,)
    gradient = score - score.mean()
    velocity = momentum * state.velocity + lr * gradient
    moved = (state.weights + velocity).clamp(min=0.0)
    total = moved.sum()
    weights = moved / total if total > 0 else torch.full_like(moved, 1.0 / count)
    weights = apply_floor(weights, min_weight)
    at_floor = weights <= min_weight
    velocity = torch.where(at_floor & (velocity < 0), torch.zeros_like(velocity), velocity)
    return CurriculumState(weights, velocity)


class MixtureDataset(Dataset):
    """Several datasets behind one index: ``dataset[(d, [i, j, ...])]`` is ``(d, [examples i, j, ... of d])``, one
    homogeneous batch, which :class:`MixtureCollate` hands to dataset ``d``'s own collation."""

    def __init__(self, datasets: list):
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.datasets)

    def __getitem__(self, key: tuple[int, list[int]]) -> tuple[int, list]:
        dataset_index, indices = key
        return dataset_index, [self.datasets[dataset_index][i] for i in indices]


class MixtureCollate:
    """Collates a :class:`MixtureDataset` batch with the collation of the dataset it came from (picklable, for
    worker processes)."""

    def __init__(self, collate_fns: list[Optional[Callable[[list], dict]]]):
        self.collate_fns = [fn or default_collate for fn in collate_fns]

    def __call__(self, item: tuple[int, list]) -> dict:
        dataset_index, examples = item
        return self.collate_fns[dataset_index](examples)


def _permutation(length: int, *seed_parts: int) -> list[int]:
    return torch.randperm(length, generator=seeded_generator(*seed_parts)).tolist()


class CurriculumSampler(DistributedSampler):
    """Yields one ``(dataset_index, example_indices)`` key per training batch of this rank.

    The dataset of each step is drawn from ``weights`` (read live: an update applies from the next batch drawn)
    with a generator seeded by ``(seed, epoch)``, the same on every rank. Each dataset is walked in a shuffled
    order seeded by ``(seed, epoch, dataset)``; a step takes ``batch_size × world_size`` consecutive examples and
    this rank its ``batch_size`` share; a dataset walked to its end is reshuffled (a new cycle). So a step's
    batches on all ranks come from one dataset and never overlap.

    Resuming: the sampler notes its position before each draw (generator state, cursors, cycles, samples drawn) and
    the weights it drew with. ``state_at(k)`` is the position before batch ``k`` plus the weights of the batches
    from ``k`` on that were already drawn: DataLoader workers (and prefetching) draw ahead of the step being
    trained, so those batches saw older weights than the checkpoint holds. After ``load_state``, the epoch
    continues from batch ``k`` with those weights, then the live ones: the draws of the uninterrupted run, from any
    checkpoint.

    A subclass of DistributedSampler so that Lightning sees sharding done and does not wrap it.
    """

    def __init__(self, lengths: list[int], weights: Tensor, samples_drawn: Tensor, batch_size: int,
                 num_batches: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 names: Optional[list[str]] = None, batches_done: Callable[[], int] = lambda: 0):
        """
        Args:
            lengths: examples in each of the D datasets.
            weights: (D,) sampling probabilities, updated in place by the curriculum.
            samples_drawn: (D,) counter of examples drawn per dataset over all ranks, increased in place.
            batch_size: examples per batch on this rank.
            num_batches: batches per epoch on each rank.
            names: the datasets' names, for error messages.
            batches_done: how many of the epoch's batches training has processed (older positions are dropped).
        """
        self.lengths, self.weights, self.samples_drawn = lengths, weights, samples_drawn
        self.batch_size, self.num_batches = batch_size, num_batches
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.shuffle, self.drop_last = True, True  # read by Lightning
        self.batches_done = batches_done
        self._positions: dict[int, dict] = {}  # batch index -> position before drawing it, and its weights
        self._resume: Optional[dict] = None
        step_size = batch_size * num_replicas
        for index, length in enumerate(lengths):
            if length < step_size:
                name = f"datasets.{names[index]}" if names else f"dataset {index}"
                raise ValueError(f"{name} has {length} training examples, fewer than one step needs "
                                 f"(batch_size {batch_size} × {num_replicas} ranks)")

    def __len__(self) -> int:
        return self.num_batches

    def state_at(self, batches_done: int) -> dict:
        positions = {index: position for index, position in self._positions.items() if index >= batches_done}
        return {"epoch": self.epoch, "positions": positions if batches_done in positions else {}}

    def load_state(self, state: dict) -> None:
        self._resume = state if state["positions"] else None

    def __iter__(self):
        resume, self._resume = (self._resume if self._resume and self._resume["epoch"] == self.epoch else None), None
        choice = seeded_generator(self.seed, self.epoch)
        cursors, cycles, first, recorded = [0] * len(self.lengths), [0] * len(self.lengths), 0, {}
        if resume is not None:
            recorded = resume["positions"]
            first = min(recorded)
            choice.set_state(recorded[first]["generator"])
            cursors, cycles = list(recorded[first]["cursors"]), list(recorded[first]["cycles"])
            self.samples_drawn.copy_(recorded[first]["samples_drawn"])
        orders = [_permutation(length, self.seed, self.epoch, d, cycles[d]) for d, length in enumerate(self.lengths)]
        step_size = self.batch_size * self.num_replicas

        def position() -> dict:  # where the draws are, before the next one
            return {"generator": choice.get_state(), "cursors": list(cursors), "cycles": list(cycles),
                    "samples_drawn": self.samples_drawn.clone()}

        self._positions = {first: position()}
        for index in range(first, self.num_batches):
            weights = recorded[index]["weights"] if "weights" in recorded.get(index, {}) else self.weights.clone()
            self._positions[index]["weights"] = weights
            d = int(torch.multinomial(weights.double(), 1, generator=choice))
            if cursors[d] + step_size > self.lengths[d]:
                cycles[d] += 1
                orders[d] = _permutation(self.lengths[d], self.seed, self.epoch, d, cycles[d])
                cursors[d] = 0
            start = cursors[d] + self.rank * self.batch_size
            cursors[d] += step_size
            self.samples_drawn[d] += step_size
            # Noted before the batch leaves: a checkpoint written before the next draw resumes from here.
            done = self.batches_done()
            self._positions = {key: value for key, value in self._positions.items() if key >= done}
            self._positions[index + 1] = position()
            yield d, orders[d][start:start + self.batch_size]


class SequentialMixtureSampler(DistributedSampler):
    """Evaluation keys: every dataset's examples in order, cut into batches of one dataset each, the batches dealt
    round-robin to the ranks."""

    def __init__(self, lengths: list[int], batch_size: int, num_replicas: int = 1, rank: int = 0):
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.shuffle, self.drop_last = False, False  # read by Lightning
        keys = [(d, list(range(start, min(start + batch_size, length))))
                for d, length in enumerate(lengths) for start in range(0, length, batch_size)]
        self.keys = keys[rank::num_replicas]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        return iter(self.keys)


class CurriculumDataModule(L.LightningDataModule):
    """Several named datasets mixed with adaptive weights (see the module docstring).

    Each entry of ``datasets`` is any of the package's DataModules (WikiText-style text, dialog, bilingual, SQuAD,
    JSONL prompts or questions, embedded corpus...) with its own preprocessing; all must share one tokenizer.
    Their own batch sizes are ignored: ``batch_size`` and ``eval_batch_size`` apply to every dataset. Validation
    runs over every dataset's validation split (one pooled ``val/*`` metric, so checkpointing on ``val/loss``
    works as for a single dataset).

    The weights start at ``initial_weights`` (uniform by default) and move only when the
    :class:`~lit_distill.callbacks.Autocurriculum` callback is in the trainer; they, the velocity, the last
    difficulties and the sample counts are saved in checkpoints and restored on resume.
    """

    def __init__(self, datasets: dict[str, EncodedDataModule], batch_size: int = 8,
                 eval_batch_size: Optional[int] = None, initial_weights: Optional[dict[str, float]] = None,
                 lr: float = 0.1, momentum: float = 0.9, variance_weight: float = 0.5, min_weight: float = 0.05,
                 difficulty_sample_size: int = 64, batches_per_epoch: Optional[int] = None, num_workers: int = 0,
                 seed: int = 0):
        """
        Args:
            datasets: name -> DataModule, e.g. ``{"text": WikiTextDataModule(...), "qa": SQuADDataModule(...)}``.
            initial_weights: name -> weight (normalised here); uniform when None.
            lr, momentum, variance_weight, min_weight: the update rule's η, β, λ and floor
                (see :func:`curriculum_update`).
            difficulty_sample_size: training examples per dataset (fixed at setup) on which the difficulty is
                measured, split across ranks.
            batches_per_epoch: batches per epoch on each rank; by default as many as all datasets' training
                examples fill.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["datasets"])
        if not datasets:
            raise ValueError("datasets is empty: give at least one name -> DataModule")
        for name, module in datasets.items():
            if not isinstance(module, EncodedDataModule):
                raise TypeError(f"datasets.{name}: expected one of lit_distill's DataModules (an EncodedDataModule),"
                                f" got {type(module).__name__}")
        self.names = list(datasets)
        self.modules = datasets
        self._check_one_tokenizer()
        self.tokenizer = datasets[self.names[0]].tokenizer
        weights = torch.ones(len(self.names), dtype=torch.float64)
        if initial_weights is not None:
            unknown = set(initial_weights) - set(self.names)
            if unknown:
                raise ValueError(f"initial_weights names {sorted(unknown)} are not datasets ({self.names})")
            weights = torch.tensor([float(initial_weights.get(name, 0.0)) for name in self.names], dtype=torch.float64)
            if (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"initial_weights must be >= 0 with a positive sum, got {initial_weights}")
        # Plain tensors updated in place: the sampler reads the same storage.
        self.weights = weights / weights.sum()
        self.velocity = torch.zeros_like(self.weights)
        self.difficulty = torch.full_like(self.weights, float("nan"))
        self.variance = torch.full_like(self.weights, float("nan"))
        self.samples_drawn = torch.zeros_like(self.weights)
        self._difficulty_indices: Optional[list[list[int]]] = None

    def _check_one_tokenizer(self) -> None:
        first = self.names[0]
        vocab = self.modules[first].tokenizer.get_vocab()
        for name in self.names[1:]:
            if self.modules[name].tokenizer.get_vocab() != vocab:
                raise ValueError(f"datasets.{name} uses a tokenizer ({self.modules[name].hparams.tokenizer}) with a "
                                 f"different vocabulary from datasets.{first} "
                                 f"({self.modules[first].hparams.tokenizer}); all datasets must share one")

    # ---- the update, applied in place ---------------------------------------------------------------------
    def update_weights(self, difficulty: Tensor, variance: Tensor) -> None:
        """Record the measured difficulties (D,) and move the weights by :func:`curriculum_update`."""
        hp = self.hparams
        state = curriculum_update(CurriculumState(self.weights, self.velocity), difficulty.double(),
                                  variance.double(), lr=hp.lr, momentum=hp.momentum,
                                  variance_weight=hp.variance_weight, min_weight=hp.min_weight)
        self.set_weights(state.weights, state.velocity)
        self.difficulty.copy_(difficulty)
        self.variance.copy_(variance)

    def set_weights(self, weights: Tensor, velocity: Tensor) -> None:
        self.weights.copy_(weights)
        self.velocity.copy_(velocity)

    # ---- data ---------------------------------------------------------------------------------------------
    def check_rows(self, task: Optional[str] = None) -> None:
        for module in self.modules.values():
            module.check_rows(task)

    def prepare_data(self) -> None:
        for module in self.modules.values():
            module.trainer = self.trainer  # members see the trained module, as the top-level DataModule does
            module.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        for module in self.modules.values():
            module.trainer = self.trainer
            module.setup(stage)

    def _split(self, split: str) -> tuple[MixtureDataset, MixtureCollate]:
        datasets = [self.modules[name].datasets[split] for name in self.names]
        collate = MixtureCollate([self.modules[name].collate_fn(split) for name in self.names])
        return MixtureDataset(datasets), collate

    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset, collate = self._split("train")
        world_size, rank = self._world()
        lengths = [len(d) for d in dataset.datasets]
        num_batches = hp.batches_per_epoch or max(1, sum(lengths) // (hp.batch_size * world_size))
        batches_done = batches_processed(self.trainer)
        sampler = CurriculumSampler(lengths, self.weights, self.samples_drawn, hp.batch_size, num_batches,
                                    world_size, rank, hp.seed, names=self.names, batches_done=batches_done)
        # batch_size=None: each key the sampler yields is a whole batch.
        return ResumableLoader(dataset, sampler, batches_done, batch_size=None, collate_fn=collate,
                               num_workers=hp.num_workers)

    def _evaluation_loader(self, split: str) -> DataLoader:
        hp = self.hparams
        dataset, collate = self._split(split)
        world_size, rank = self._world()
        sampler = SequentialMixtureSampler([len(d) for d in dataset.datasets], hp.eval_batch_size or hp.batch_size,
                                           world_size, rank)
        return DataLoader(dataset, sampler=sampler, batch_size=None, collate_fn=collate, num_workers=hp.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader("validation")

    def difficulty_batches(self, dataset_index: int, rank: int = 0, world_size: int = 1) -> list[dict]:
        """This rank's share of the fixed difficulty sample of one dataset, collated in evaluation-size batches.

        The sample (``difficulty_sample_size`` training examples, or all when fewer) is drawn once, seeded by
        ``seed``, so successive measurements compare like with like; ranks take interleaved shares."""
        hp = self.hparams
        datasets = [self.modules[name].datasets["train"] for name in self.names]
        if self._difficulty_indices is None:
            generator = torch.Generator().manual_seed(hp.seed)
            self._difficulty_indices = [torch.randperm(len(d), generator=generator)[:hp.difficulty_sample_size].tolist()
                                        for d in datasets]
        indices = self._difficulty_indices[dataset_index][rank::world_size]
        collate = self.modules[self.names[dataset_index]].collate_fn("train") or default_collate
        size = hp.eval_batch_size or hp.batch_size
        return [collate([datasets[dataset_index][i] for i in indices[start:start + size]])
                for start in range(0, len(indices), size)]

    # ---- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"names": list(self.names), "weights": self.weights.clone(), "velocity": self.velocity.clone(),
                "difficulty": self.difficulty.clone(), "variance": self.variance.clone(),
                "samples_drawn": self.samples_drawn.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"the checkpoint's curriculum has datasets {state['names']}, this configuration has "
                             f"{self.names}; resume with the same datasets in the same order")
        for key in ("weights", "velocity", "difficulty", "variance", "samples_drawn"):
            getattr(self, key).copy_(state[key])
