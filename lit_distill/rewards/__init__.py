"""Reward functions for RL: ``Reward.forward(prompts, completions, **columns) -> list[float]``.

Rule-based: :class:`ArithmeticReward`, :class:`ReferenceMatch`, :class:`RepetitionPenalty`; any Python function:
:class:`CallableReward`; model-based (frozen): :class:`TokenEmbeddingCosine`, :class:`SentenceEmbeddingCosine`,
:class:`InverseLoss`, :class:`RewardModelScore`. :class:`WeightedRewards` sums several into one (B,) score.
"""
from lit_distill.rewards.arithmetic import ArithmeticReward
from lit_distill.rewards.base import (
    CallableReward,
    MissingColumnError,
    Reward,
    WeightedRewards,
)
from lit_distill.rewards.embedding import TokenEmbeddingCosine
from lit_distill.rewards.likelihood import InverseLoss
from lit_distill.rewards.reference import ReferenceMatch
from lit_distill.rewards.repetition import RepetitionPenalty
from lit_distill.rewards.reward_model import RewardModelScore
from lit_distill.rewards.sentence_embedding import SentenceEmbeddingCosine

__all__ = ["ArithmeticReward", "CallableReward", "InverseLoss", "MissingColumnError", "ReferenceMatch",
           "RepetitionPenalty", "Reward", "RewardModelScore", "SentenceEmbeddingCosine", "TokenEmbeddingCosine",
           "WeightedRewards"]
