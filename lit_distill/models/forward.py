"""The forward pass every trainer, evaluator and teacher-cache builder shares."""

from __future__ import annotations

import torch
from torch import nn

from lit_distill.rollout.sampling import position_ids_from_mask


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) with position ids derived from the mask, so left padding is handled.

    ``use_cache=False``: a training or scoring pass reads no KV cache afterwards, and HF models would otherwise fill
    a fresh ``DynamicCache`` (Python work per layer, and every layer's keys and values kept alive with the output).
    """
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
