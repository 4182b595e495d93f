"""Distillation and preference losses: pure tensor functions, no model or Lightning code."""
from lit_distill.losses.kd import DIVERGENCES, KDStats, align_vocab, kd_loss, token_divergence
from lit_distill.losses.logprobs import sequence_logprobs_from_logits, token_logprobs
from lit_distill.losses.preference import DPO_LOSS_TYPES, DPOStats, RewardStats, dpo_loss, reward_loss

__all__ = ["DIVERGENCES", "DPO_LOSS_TYPES", "DPOStats", "KDStats", "RewardStats", "align_vocab", "dpo_loss",
           "kd_loss", "reward_loss", "sequence_logprobs_from_logits", "token_divergence", "token_logprobs"]
