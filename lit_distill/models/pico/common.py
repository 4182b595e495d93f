"""What the three pico models share: the config base class, the causal-LM loss and the input / cache helpers.

Shapes: B batch rows, S new tokens of this call, T = past + S positions, V vocabulary size.

Imports only torch, transformers and huggingface_hub: ``save_pretrained`` copies this file next to the weights
(see ``__init__``), so it must run where ``lit_distill`` is not installed.
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor
from transformers import Cache, PreTrainedConfig


@strict
class PicoConfig(PreTrainedConfig):
    """Fields every pico config has; each subclass adds its architecture (and ``validate_architecture``).

    ``dropout`` applies wherever the model has one (see the subclass); the ``*_token_id`` fields are filled from
    the tokenizer by ``build_model``.
    """

    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 1024
    dropout: Union[int, float] = 0.0
    initializer_range: Union[int, float] = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of position t's logits against label t + 1 (labels -100 ignored), in fp32.

    Args:
        logits: (B, T, V).
        labels: (B, T).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} need logits for every position, got {tuple(logits.shape)} "
                         "(do not combine labels with logits_to_keep)")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def keep_last(hidden: Tensor, logits_to_keep: Union[int, Tensor]) -> Tensor:
    """(B, S, ...) -> the positions ``logits_to_keep`` selects (an int n > 0: the last n; 0: all; a tensor: those)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


def new_token_mask(attention_mask: Optional[Tensor], input_ids: Tensor) -> Tensor:
    """(B, S) bool mask of the S new tokens from a mask over them (or over past + new tokens, HF convention)."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.size(1) < input_ids.size(1):
        raise ValueError(f"attention_mask has {attention_mask.size(1)} columns for {input_ids.size(1)} tokens")
    return attention_mask[:, -input_ids.size(1):].bool()


def real_tokens_first(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where to find each row's real tokens in order.

    Args:
        mask: (B, S) bool, True on real tokens.

    Returns:
        order (B, S): column indices with each row's real tokens first, in their order, then its padding;
        lengths (B,): real tokens per row;
        counts (B, S): number of real tokens at or before each position (``cumsum``).
    """
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
    counts = mask.long().cumsum(1)
    return order, counts[:, -1], counts


def cache_argument(past_key_values, kwargs: dict):
    """The cache the caller passed: transformers >= 5.24 passes it as ``cache`` (``generate`` does), earlier
    versions and our sampling engine as ``past_key_values``."""
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


def is_empty_cache(past_key_values) -> bool:
    """True for no cache or an empty HF cache (our sampling engine starts every rollout with ``DynamicCache()``)."""
    return past_key_values is None or (isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0)
