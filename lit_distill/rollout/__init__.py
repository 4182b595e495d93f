"""Batched KV-cached sampling and sequence scoring for on-policy distillation and RL."""

from lit_distill.rollout.sampling import Rollout, generate, left_pad, position_ids_from_mask, sequence_logprobs

__all__ = ["Rollout", "generate", "left_pad", "position_ids_from_mask", "sequence_logprobs"]
