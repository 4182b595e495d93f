"""``pico_lstm``: embedding -> stack of one-layer ``nn.LSTM`` -> linear head.

The cache is the recurrent state, a :class:`PicoLSTMState` holding ``(h, c)``. ``position_ids`` are ignored (the
recurrence orders the tokens) and a masked token never changes the state.

Imports only torch, transformers, huggingface_hub and ``.common``: ``save_pretrained`` copies this file and
``common.py`` next to the weights, for loading without lit_distill (see the package docstring).

Shapes: B batch rows, S new tokens, L layers, H hidden size, V vocabulary size.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .common import (PicoConfig, cache_argument, causal_lm_loss, is_empty_cache, keep_last, new_token_mask,
                     real_tokens_first)


@strict
class PicoLSTMConfig(PicoConfig):
    """Configuration of :class:`PicoLSTMForCausalLM`: ``num_hidden_layers`` LSTM layers of width ``hidden_size``
    (also the embedding size, so the head can be tied to the embedding); ``dropout`` applies to the embeddings,
    between layers and before the head."""

    model_type = "pico_lstm"

    hidden_size: int = 256
    num_hidden_layers: int = 2

    def validate_architecture(self):
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")


@dataclass
class PicoLSTMState:
    """The "KV cache" of :class:`PicoLSTMForCausalLM`: the recurrent state after the last real token.

    Attributes:
        h, c: (L, B, H) hidden and cell state of every layer.
    """

    h: Tensor
    c: Tensor

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # a recurrent state has no length; present for code that asks caches for one

    def reorder_cache(self, rows: Tensor) -> "PicoLSTMState":
        """The state of the batch rows ``rows`` (beam search, repeating prompts)."""
        return PicoLSTMState(self.h.index_select(1, rows), self.c.index_select(1, rows))


class PicoLSTMForCausalLM(PreTrainedModel, GenerationMixin):
    config: PicoLSTMConfig
    config_class = PicoLSTMConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = False  # cuDNN LSTMs gain little from it: their activations are per step
    _no_split_modules = ["LSTM"]
    _skip_keys_device_placement = ["past_key_values"]
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}  # active when config.tie_word_embeddings
    # Weight init: PreTrainedModel._init_weights (normal for Embedding / Linear, xavier-uniform weights and zero
    # biases for nn.LSTM).

    def __init__(self, config: PicoLSTMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # One nn.LSTM per layer (rather than num_layers=L) so that `decoder_layers` / `keep_layers` see the stack.
        self.layers = nn.ModuleList(nn.LSTM(config.hidden_size, config.hidden_size, batch_first=True)
                                    for _ in range(config.num_hidden_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> PicoLSTMState:
        zeros = torch.zeros(len(self.layers), batch, self.config.hidden_size, device=device, dtype=dtype)
        return PicoLSTMState(zeros, zeros.clone())

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[Union[PicoLSTMState, Cache]] = None,
                use_cache: bool = False, labels: Optional[Tensor] = None, logits_to_keep: Union[int, Tensor] = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, S', V); ``past_key_values`` is the :class:`PicoLSTMState` after the last real token.

        ``position_ids`` are ignored (the recurrence orders the tokens); masked tokens leave the state unchanged.
        """
        past_key_values = cache_argument(past_key_values, kwargs)
        batch, length = input_ids.shape
        x = self.dropout(self.embed_tokens(input_ids))  # (B, S, H)
        if is_empty_cache(past_key_values):
            state = self.initial_state(batch, x.device, x.dtype)
        elif isinstance(past_key_values, PicoLSTMState):
            state = past_key_values
        else:
            raise TypeError(f"pico_lstm continues from a PicoLSTMState, got {type(past_key_values).__name__}")
        mask = new_token_mask(attention_mask, input_ids)  # (B, S)
        h_n, c_n = [], []
        if bool(mask.all()):
            for i, layer in enumerate(self.layers):
                if i:
                    x = self.dropout(x)
                x, (h, c) = layer(x, (state.h[i:i + 1].contiguous(), state.c[i:i + 1].contiguous()))
                h_n.append(h)
                c_n.append(c)
            hidden = x  # (B, S, H)
        else:
            # Run each row over its real tokens only: gather them to the front, pack with the real lengths (rows
            # without any real token get length 1 and their state restored below), then scatter outputs back:
            # position t shows the output after the last real token at or before t.
            order, lengths, counts = real_tokens_first(mask)
            x = x.gather(1, order[..., None].expand_as(x))
            packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
            for i, layer in enumerate(self.layers):
                if i:
                    packed = packed._replace(data=self.dropout(packed.data))
                packed, (h, c) = layer(packed, (state.h[i:i + 1].contiguous(), state.c[i:i + 1].contiguous()))
                h_n.append(h)
                c_n.append(c)
            out, _ = pad_packed_sequence(packed, batch_first=True, total_length=length)  # (B, S, H)
            hidden = out.gather(1, (counts - 1).clamp(min=0)[..., None].expand_as(out))
            hidden = torch.where(counts[..., None] > 0, hidden, state.h[-1][:, None, :])
            none_real = (lengths == 0)[None, :, None]  # (1, B, 1)
            h_n = [torch.where(none_real, state.h[i:i + 1], h) for i, h in enumerate(h_n)]
            c_n = [torch.where(none_real, state.c[i:i + 1], c) for i, c in enumerate(c_n)]
        logits = self.lm_head(self.dropout(keep_last(hidden, logits_to_keep)))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        new_state = PicoLSTMState(torch.cat(h_n), torch.cat(c_n)) if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=new_state)
