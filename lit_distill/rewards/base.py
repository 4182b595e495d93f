"""Reward functions for RL: ``(prompts, completions, **columns) -> list[float]``, and their weighted sum.

Shapes: B batch (number of completions).

A reward sees the exact prompt strings the policy was given (chat template applied), the decoded completions
(special tokens skipped) and the example's other dataset columns as lists of length B (``answer``,
``reference``, ...). It uses the columns it needs, ignores the rest, and names a missing one in its error.

Model-based rewards hold frozen models as submodules, so that a LightningModule moves them to its device; they
stay in eval mode whatever ``train()`` is called with (dropout would make the reward random) and never build
an autograd graph.
"""

from __future__ import annotations

import importlib
import itertools
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_distill.data.collate import fit_prompt


class MissingColumnError(KeyError):
    """A reward needs a dataset column the batch does not have."""

    def __str__(self) -> str:  # KeyError's own __str__ would print the message's repr
        return str(self.args[0])


class Reward(nn.Module):
    """Base class of reward functions.

    Subclasses implement ``forward(prompts, completions, **columns) -> list[float]``.

    Attributes:
        name: the key under which :class:`WeightedRewards` logs this reward (``rewards/<name>``); ``None``: the
            class name in snake case.
    """

    name: str | None = None

    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        """Score each completion of its prompt.

        Args:
            prompts: B prompt strings as the policy saw them.
            completions: B decoded completions.
            **columns: per-example dataset columns, each a list of length B.

        Returns:
            B floats.
        """
        raise NotImplementedError

    def column(self, columns: dict[str, list], name: str) -> list:
        """The column ``name`` of ``columns``.

        Raises:
            MissingColumnError: (a ``KeyError``) naming this reward, the column and the columns there are.
        """
        if name not in columns:
            raise MissingColumnError(f"{type(self).__name__} needs the dataset column '{name}'; the batch has the "
                                     f"columns {sorted(columns)}")
        return columns[name]

    def train(self, mode: bool = True) -> Reward:
        """Record ``mode`` but keep every inner model in eval mode: a reward is never trained."""
        self.training = mode
        for module in self.children():
            module.train(False)
        return self

    @property
    def device(self) -> torch.device:
        """Device of the reward's parameters or buffers (CPU for a reward without any)."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device


def frozen(module: nn.Module) -> nn.Module:
    """``module`` with gradients off and in eval mode."""
    return module.requires_grad_(False).eval()


def fit_pair(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a tokenised (prompt, completion) pair to at most ``max_length`` tokens.

    The completion keeps its first ``max_length - 1`` tokens (a reward must score every completion, however
    long the policy made it), then the prompt loses tokens from the left (see
    :func:`lit_distill.data.collate.fit_prompt`); at least one prompt token is kept.
    """
    completion_ids = completion_ids[:max_length - 1]
    return fit_prompt(prompt_ids, len(completion_ids), max_length), completion_ids


def as_scores(values: Any, batch_size: int, who: str) -> list[float]:
    """Check that a reward returned ``batch_size`` finite real numbers and return them as floats.

    Args:
        values: what the reward returned: a sequence of numbers, or a 1-D tensor or array.
        batch_size: B, the number of completions it was given.
        who: the reward's name for the error message.

    Raises:
        TypeError: ``values`` is not a sequence of real numbers.
        ValueError: wrong length, or a NaN/inf value.
    """
    if hasattr(values, "tolist"):  # a tensor or NumPy array
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"reward '{who}' must return a list of {batch_size} numbers, got {type(values).__name__}")
    if len(values) != batch_size:
        raise ValueError(f"reward '{who}' returned {len(values)} values for {batch_size} completions")
    bad = [value for value in values if not isinstance(value, numbers.Real)]
    if bad:
        raise TypeError(f"reward '{who}' must return real numbers, got {type(bad[0]).__name__} ({bad[0]!r})")
    scores = [float(value) for value in values]
    non_finite = [i for i, value in enumerate(scores) if not math.isfinite(value)]
    if non_finite:
        raise ValueError(f"reward '{who}' returned non-finite values at positions {non_finite[:5]}: "
                         f"{[scores[i] for i in non_finite[:5]]}")
    return scores


def import_callable(path: str) -> Callable:
    """The object named by ``"package.module.attribute"`` or ``"package.module:attribute"``.

    Raises:
        ImportError: the module cannot be imported or has no such attribute.
        TypeError: the object is not callable.
    """
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ImportError(f"'{path}' is no import path; expected 'package.module.function' or "
                          "'package.module:function'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import module '{module_name}' of '{path}': {err}") from err
    try:
        for part in attribute.split("."):  # "module:Class.method" also works
            target = getattr(target, part)
    except AttributeError as err:
        raise ImportError(f"module '{module_name}' has no attribute '{attribute}' (from '{path}')") from err
    if not callable(target):
        raise TypeError(f"'{path}' is not callable (type {type(target).__name__})")
    return target


class CallableReward(Reward):
    """Any Python function ``f(prompts, completions, **columns) -> list[float]`` as a reward.

    Args:
        function: import path, ``"package.module.function"`` or ``"package.module:function"``; the module
            must be importable (installed, or on ``PYTHONPATH``).
        name: the logged name; defaults to the function's ``__name__``.
    """

    def __init__(self, function: str, name: str | None = None):
        super().__init__()
        self.function = import_callable(function)
        self.path = function
        self.name = name or getattr(self.function, "__name__", None)

    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        return as_scores(self.function(prompts, completions, **columns), len(completions), self.path)


def snake_case(name: str) -> str:
    """``"RewardModelScore"`` -> ``"reward_model_score"`` (acronyms kept whole: ``"BLEUScore"`` -> ``"bleu_score"``)."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def unique_names(rewards: Sequence[Reward]) -> list[str]:
    """Each reward's ``name`` (or snake-cased class name); a name used more than once gets ``_1``, ``_2``, ..."""
    names = [reward.name or snake_case(type(reward).__name__) for reward in rewards]
    counts, seen = {name: names.count(name) for name in names}, {}
    unique = []
    for name in names:
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}_{seen[name]}"
        unique.append(name)
    return unique


class WeightedRewards(nn.Module):
    """The weighted sum of several rewards, with each reward's raw values kept for logging.

    Args:
        rewards: one or more rewards.
        weights: one weight per reward; ``None``: all 1.
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None):
        super().__init__()
        if not rewards:
            raise ValueError("WeightedRewards needs at least one reward")
        not_rewards = [type(reward).__name__ for reward in rewards if not isinstance(reward, Reward)]
        if not_rewards:
            raise TypeError(f"rewards must be lit_distill.rewards.Reward instances, got {not_rewards} (wrap a plain "
                            "function in CallableReward)")
        weights = [1.0] * len(rewards) if weights is None else [float(weight) for weight in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"{len(weights)} reward weights for {len(rewards)} rewards")
        if not all(math.isfinite(weight) for weight in weights):
            raise ValueError(f"reward weights must be finite, got {weights}")
        self.rewards = nn.ModuleList(rewards)
        self.weights = weights
        self.names = unique_names(rewards)

    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> tuple[Tensor, dict[str, Tensor]]:
        """Score a batch with every reward.

        Args:
            prompts: B prompt strings.
            completions: B decoded completions.
            **columns: per-example dataset columns, each of length B.

        Returns:
            ``(total, parts)``: (B,) fp32 CPU weighted sum, and ``{name: (B,) fp32 CPU raw values}``.

        Raises:
            ValueError: inputs of different lengths, or a reward returned the wrong number of values or a
                non-finite value.
        """
        batch_size = len(completions)
        lengths = {"prompts": len(prompts), **{name: len(values) for name, values in columns.items()}}
        wrong = {name: length for name, length in lengths.items() if length != batch_size}
        if wrong:
            raise ValueError(f"rewards got {batch_size} completions but inputs of other lengths: {wrong}")
        total = torch.zeros(batch_size, dtype=torch.float64)  # (B,) summed in fp64, returned in fp32
        parts = {}
        for name, weight, reward in zip(self.names, self.weights, self.rewards):
            values = torch.tensor(as_scores(reward(prompts, completions, **columns), batch_size, name),
                                  dtype=torch.float64)  # (B,)
            total += weight * values
            parts[name] = values.float()
        if not torch.isfinite(total.float()).all():
            raise ValueError(f"the weighted reward sum overflows fp32: rewards {list(parts)}, weights {self.weights}")
        return total.float(), parts
