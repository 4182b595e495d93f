"""Batched KV-cached sampling and sequence scoring for on-policy distillation and RL."""

from lit_distill.rollout.sampling import (
    FinishReason,
    Rollout,
    generate,
    generation_mode,
    left_pad,
    position_ids_from_mask,
    rollout_generator,
    seeded_generator,
    sequence_logprobs,
)
from lit_distill.rollout.spec import Sampling

__all__ = ["FinishReason", "Rollout", "Sampling", "generate", "generation_mode", "left_pad", "position_ids_from_mask",
           "rollout_generator", "seeded_generator", "sequence_logprobs"]
