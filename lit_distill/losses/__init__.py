"""Distillation, preference and RL losses: pure tensor functions, no model or Lightning code."""
from lit_distill.losses.cross_tokenizer import (CROSS_TOKENIZER_METHODS, CrossTokenizerStats, build_first_token_map,
                                              build_vocab_map, cross_tokenizer_loss, monotone_ends, span_starts,
                                              uld_distance, vocab_map_kl)
from lit_distill.losses.grpo import GRPO_LOSS_TYPES, GRPOStats, grpo_denominator, grpo_loss, step_denominators
from lit_distill.losses.kd import DIVERGENCES, KDStats, align_vocab, kd_loss, token_divergence
from lit_distill.losses.logprobs import sequence_logprobs_from_logits, token_logprobs
from lit_distill.losses.ppo import (IMPORTANCE_SAMPLING_LEVELS, PolicyStats, ValueStats, clipped_policy_loss,
                                    clipped_value_loss)
from lit_distill.losses.preference import (DPO_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, DPOStats, KTOStats,
                                          ORPOStats, RewardStats, dpo_loss, kto_loss, log_odds, orpo_loss,
                                          reward_loss, simpo_loss)
from lit_distill.losses.topk_kd import topk_kd_loss
from lit_distill.losses.rl import (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, SCALE_REWARDS, best_worst_pairs,
                                   equal_reward_groups, gae, group_advantages, kl_estimate, masked_mean, masked_sum,
                                   masked_var, masked_whiten, reinforce_pp_advantages, rloo_advantages)

__all__ = ["ADVANTAGE_ESTIMATORS", "IMPORTANCE_SAMPLING_LEVELS", "best_worst_pairs", "equal_reward_groups",
           "reinforce_pp_advantages", "rloo_advantages",
           "CROSS_TOKENIZER_METHODS", "CrossTokenizerStats", "build_first_token_map", "build_vocab_map", "cross_tokenizer_loss",
           "monotone_ends", "span_starts", "uld_distance", "vocab_map_kl",
           "DIVERGENCES", "DPOStats", "DPO_LOSS_TYPES", "GRPOStats", "GRPO_LOSS_TYPES", "KDStats", "KL_ESTIMATORS",
           "KTOStats", "ORPOStats", "PolicyStats", "REFERENCE_FREE_LOSS_TYPES", "RewardStats", "SCALE_REWARDS",
           "ValueStats", "align_vocab", "clipped_policy_loss", "clipped_value_loss", "dpo_loss", "gae",
           "group_advantages", "grpo_denominator", "grpo_loss", "kd_loss", "kl_estimate", "kto_loss", "log_odds",
           "masked_mean", "masked_sum", "masked_var", "masked_whiten", "orpo_loss", "reward_loss",
           "sequence_logprobs_from_logits", "simpo_loss", "step_denominators", "token_divergence", "token_logprobs",
           "topk_kd_loss"]
