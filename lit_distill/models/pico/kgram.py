"""``pico_kgram``: a fixed-context MLP language model (Bengio et al., 2003).

The logits at position t depend only on the last ``context_size`` real tokens up to t (concatenated embeddings ->
MLP -> vocabulary); missing context (sequence start) uses a learned "empty" embedding. The cache is a
:class:`PicoKGramCache` holding the last ``context_size - 1`` real tokens of each row; ``position_ids`` are ignored
and a masked token enters no context.

Imports only torch, transformers, huggingface_hub and ``.common``: ``save_pretrained`` copies this file and
``common.py`` next to the weights, for loading without lit_distill (see the package docstring).

Shapes: B batch rows, S new tokens, k ``context_size``, E ``embedding_size``, V vocabulary size.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .common import (PicoConfig, cache_argument, causal_lm_loss, is_empty_cache, keep_last, new_token_mask,
                     real_tokens_first)

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


@strict
class PicoKGramConfig(PicoConfig):
    """Configuration of :class:`PicoKGramForCausalLM`.

    The last ``context_size`` tokens' embeddings (``embedding_size`` each) are concatenated and projected to
    ``hidden_size`` with ``hidden_act`` (Bengio et al.'s hidden layer); ``num_hidden_layers`` residual blocks
    (Linear + ``hidden_act``, width ``hidden_size``) follow, then the output layer. ``num_hidden_layers=0`` is the
    original one-hidden-layer model.
    """

    model_type = "pico_kgram"

    context_size: int = 4
    embedding_size: int = 32
    hidden_size: int = 256
    num_hidden_layers: int = 1
    hidden_act: str = "tanh"  # tanh | gelu | relu | silu
    tie_word_embeddings: bool = False  # no tying: the head and the embedding differ in width in general

    def validate_architecture(self):
        if self.context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {self.context_size}")
        if self.num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got '{self.hidden_act}'")


@dataclass
class PicoKGramCache:
    """The cache of :class:`PicoKGramForCausalLM`.

    Attributes:
        tokens: (B, k - 1) the last real tokens of each row, oldest first; -1 where the sequence has fewer (the
            learned "empty" embedding is used there).
    """

    tokens: Tensor

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def reorder_cache(self, rows: Tensor) -> "PicoKGramCache":
        return PicoKGramCache(self.tokens.index_select(0, rows))


class PicoKGramBlock(nn.Module):
    def __init__(self, config: PicoKGramConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.act(self.fc(x)))


class PicoKGramForCausalLM(PreTrainedModel, GenerationMixin):
    config: PicoKGramConfig
    config_class = PicoKGramConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = False  # the activations are a few (B, T, hidden) tensors: nothing to save
    _no_split_modules = []
    _skip_keys_device_placement = ["past_key_values"]
    # Weight init: PreTrainedModel._init_weights (normal for Embedding / Linear, zero biases).

    def __init__(self, config: PicoKGramConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embedding_size)
        self.empty_embedding = nn.Embedding(1, config.embedding_size)  # stands for context before the start
        self.in_proj = nn.Linear(config.context_size * config.embedding_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(PicoKGramBlock(config) for _ in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[Union[PicoKGramCache, Cache]] = None,
                use_cache: bool = False, labels: Optional[Tensor] = None, logits_to_keep: Union[int, Tensor] = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, S', V): position t sees the last ``context_size`` real tokens up to and including t.

        ``position_ids`` are ignored; masked tokens are skipped (they enter no context and leave the cache alone).
        """
        past_key_values = cache_argument(past_key_values, kwargs)
        k = self.config.context_size
        batch, length = input_ids.shape
        if is_empty_cache(past_key_values):
            past = torch.full((batch, k - 1), -1, dtype=torch.long, device=input_ids.device)
        elif isinstance(past_key_values, PicoKGramCache):
            past = past_key_values.tokens
        else:
            raise TypeError(f"pico_kgram continues from a PicoKGramCache, got {type(past_key_values).__name__}")
        mask = new_token_mask(attention_mask, input_ids)
        order, lengths, counts = real_tokens_first(mask)
        # [empty, cached k-1 tokens, the real tokens in order, padding]; window i holds k tokens ending at column
        # i + k - 1, i.e. the context after i real tokens of this call (window 0: the cached context alone).
        stream = torch.cat([past.new_full((batch, 1), -1), past, input_ids.gather(1, order)], dim=1)  # (B, k + S)
        windows = stream.unfold(1, k, 1)  # (B, S + 1, k)
        kept = keep_last(counts, logits_to_keep)  # (B, S')
        context = windows.gather(1, kept[..., None].expand(-1, -1, k))  # (B, S', k)
        embedded = torch.where(context[..., None] < 0, self.empty_embedding.weight[0],
                               self.embed_tokens(context.clamp(min=0)))  # (B, S', k, E)
        hidden = self.act(self.in_proj(self.dropout(embedded.flatten(2))))  # (B, S', hidden)
        for layer in self.layers:
            hidden = layer(hidden)
        logits = self.lm_head(self.dropout(hidden))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        cache = None
        if use_cache:
            last = windows[torch.arange(batch, device=input_ids.device), lengths]  # (B, k) context after the call
            cache = PicoKGramCache(last[:, 1:].contiguous())
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
