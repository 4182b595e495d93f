"""Distillation losses: pure tensor functions, no model or Lightning code."""
from lit_distill.losses.kd import DIVERGENCES, KDStats, align_vocab, kd_loss, token_divergence

__all__ = ["DIVERGENCES", "KDStats", "align_vocab", "kd_loss", "token_divergence"]
