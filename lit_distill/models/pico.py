"""Pico models: three small causal-LM architectures that behave like Hugging Face models.

Each is a ``transformers.PreTrainedModel`` with its own config class, registered with ``AutoConfig`` and
``AutoModelForCausalLM`` when this module is imported (``lit_distill.models`` imports it), so YAML selects them like
any HF architecture::

    student:
      config: {model_type: pico_transformer, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4}
      tokenizer: lit-distill/tokenizer

* ``pico_transformer`` (:class:`PicoTransformerForCausalLM`): pre-norm decoder-only transformer: RMSNorm, rotary
  (``position_embedding="rope"``) or learned (``"learned"``) positions taken from ``position_ids`` (so left padding is
  handled), causal self-attention through ``F.scaled_dot_product_attention`` with one boolean mask combining
  causality and padding, SwiGLU (``mlp="swiglu"``) or GELU (``"gelu"``) MLP, optionally tied embeddings. Its cache is
  a ``transformers.DynamicCache`` (keys/values per layer); gradient checkpointing is supported.
* ``pico_lstm`` (:class:`PicoLSTMForCausalLM`): embedding -> stack of one-layer ``nn.LSTM`` -> linear head. Its
  cache is the recurrent state, a :class:`PicoLSTMState` holding ``(h, c)``.
* ``pico_kgram`` (:class:`PicoKGramForCausalLM`): fixed-context MLP language model (Bengio et al., 2003): the
  logits at position t depend only on the last ``context_size`` real tokens up to t (concatenated embeddings ->
  MLP -> vocabulary); missing context (sequence start) uses a learned "empty" embedding. Its cache is a
  :class:`PicoKGramCache` holding the last ``context_size - 1`` real tokens of each row.

All three follow the HF calling convention (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values``, ``use_cache``, ``labels``, ``logits_to_keep``) and return ``CausalLMOutputWithPast``, so
``lit_distill.rollout.generate`` / ``sequence_logprobs``, ``save_pretrained`` and peft LoRA (on their ``nn.Linear``
layers) work unchanged. ``attention_mask`` may cover the cached past plus the new tokens (HF convention) or only
the new tokens.

Padding (the recurrent and k-gram models ignore ``position_ids``): a position whose mask is 0 never changes the
recurrent state or the k-gram context, so a prompt gives the same continuation alone or left-padded in a batch.
When the mask of a call has zeros, the LSTM and k-gram models move each row's real tokens to the front (one stable
sort + gather), run the packed LSTM (``pack_padded_sequence``, one call per layer; the lengths go to the CPU, which
is one device sync) or build the k-token windows over them, and gather the results back, so the cost stays one
batched pass instead of a per-token loop. Logits at padded positions are those of the latest real token before them
(or of the initial state) and carry no meaning.

All three also mix in ``GenerationMixin``: HF ``model.generate`` passes their own cache objects back unchanged and
gives the same greedy tokens as our engine.

Loading a saved pico model in a fresh Python process needs the registration first: ``import lit_distill.models``
(or ``lit_distill.models.pico``; a bare ``import lit_distill`` does not import it) before
``AutoModelForCausalLM.from_pretrained(path)``, otherwise transformers reports an unknown model type.
``build_model`` / ``ModelSpec(name_or_path=...)`` already import it.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, Cache, DynamicCache, GenerationMixin,
                          PreTrainedConfig, PreTrainedModel)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------
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


def _keep_last(hidden: Tensor, logits_to_keep: Union[int, Tensor]) -> Tensor:
    """(B, T, ...) -> the positions ``logits_to_keep`` selects (an int n > 0: the last n; 0: all; a tensor: those)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


def _new_token_mask(attention_mask: Optional[Tensor], input_ids: Tensor) -> Tensor:
    """(B, S) bool mask of the S new tokens from a mask over them (or over past + new tokens, HF convention)."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.size(1) < input_ids.size(1):
        raise ValueError(f"attention_mask has {attention_mask.size(1)} columns for {input_ids.size(1)} tokens")
    return attention_mask[:, -input_ids.size(1):].bool()


def _real_tokens_first(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


def _cache_argument(past_key_values, kwargs: dict):
    """The cache the caller passed: transformers >= 5.24 passes it as ``cache`` (``generate`` does), earlier
    versions and our sampling engine as ``past_key_values``."""
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


def _is_empty_cache(past_key_values) -> bool:
    """True for no cache or an empty HF cache (our sampling engine starts every rollout with ``DynamicCache()``)."""
    return past_key_values is None or (isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0)


# ---------------------------------------------------------------------------------------------------------------
# pico_transformer
# ---------------------------------------------------------------------------------------------------------------
@strict
class PicoTransformerConfig(PreTrainedConfig):
    """Configuration of :class:`PicoTransformerForCausalLM`.

    ``intermediate_size`` defaults to ``4 * hidden_size`` for the GELU MLP and to ``8/3 * hidden_size`` (rounded up
    to a multiple of 8) for SwiGLU, which keeps both at about the same parameter count. ``num_key_value_heads``
    below ``num_attention_heads`` gives grouped-query attention.
    """

    model_type = "pico_transformer"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: Optional[int] = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None
    max_position_embeddings: int = 2048
    position_embedding: str = "rope"  # "rope" | "learned"
    rope_base: Union[int, float] = 10000.0
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    rms_norm_eps: Union[int, float] = 1e-6
    attention_bias: bool = False
    dropout: Union[int, float] = 0.0
    initializer_range: Union[int, float] = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size if self.mlp == "gelu" else 8 * -(-self.hidden_size // 3)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_architecture(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.position_embedding not in ("rope", "learned"):
            raise ValueError(f"position_embedding must be 'rope' or 'learned', got '{self.position_embedding}'")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {self.head_dim}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu' or 'gelu', got '{self.mlp}'")


class PicoRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_cos_sin(position_ids: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(B, 1, S, head_dim) cos and sin of the rotary angles at ``position_ids`` (B, S), computed in fp32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids[..., None].float() * inv_freq  # (B, S, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, S, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class PicoAttention(nn.Module):
    def __init__(self, config: PicoTransformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # index into the KV cache
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: Tensor, mask: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                past_key_values: Optional[Cache] = None) -> Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, S, d)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, S, d)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, kv, T, d): past and new
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, h, S, d)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class PicoMLP(nn.Module):
    def __init__(self, config: PicoTransformerConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.silu(self.gate_proj(x)) * self.up_proj(x) if self.swiglu else F.gelu(self.up_proj(x))
        return self.down_proj(hidden)


class PicoTransformerBlock(GradientCheckpointingLayer):
    def __init__(self, config: PicoTransformerConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = PicoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = PicoAttention(config, layer_idx)
        self.post_attention_layernorm = PicoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = PicoMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: Tensor, mask: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                past_key_values: Optional[Cache] = None) -> Tensor:
        hidden = hidden + self.dropout(self.self_attn(self.input_layernorm(hidden), mask, cos, sin, past_key_values))
        return hidden + self.dropout(self.mlp(self.post_attention_layernorm(hidden)))


class PicoTransformerPreTrainedModel(PreTrainedModel):
    config: PicoTransformerConfig
    config_class = PicoTransformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PicoTransformerBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # Weight init: PreTrainedModel._init_weights covers every module here (normal(0, initializer_range) for
    # Linear / Embedding, ones for PicoRMSNorm); rotary angles are computed on the fly, so there are no buffers.


class PicoTransformerModel(PicoTransformerPreTrainedModel):
    """The decoder stack without the output head: token (and learned position) embeddings, blocks, final norm."""

    def __init__(self, config: PicoTransformerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(PicoTransformerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = PicoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[Cache] = None,
                use_cache: bool = False, inputs_embeds: Optional[Tensor] = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, H)
        batch, length = hidden.shape[:2]
        if self.gradient_checkpointing and self.training:
            use_cache, past_key_values = False, None  # recomputing a layer must not append to the cache twice
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = past + length
        if attention_mask is None:
            attention_mask = torch.ones(batch, total, dtype=torch.long, device=hidden.device)
        elif attention_mask.size(1) == length and past:
            raise ValueError("with a cache, attention_mask must cover the cached tokens and the new ones")
        elif attention_mask.size(1) != total:
            raise ValueError(f"attention_mask has {attention_mask.size(1)} columns, expected {total}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]  # (B, S)

        # Query i (absolute index past + i) sees key j <= past + i whose mask is 1. It always sees itself, so a
        # padded query has a finite (meaningless) output instead of the NaN of an all-masked softmax row; real
        # queries never see padded keys, so padding cannot leak into real positions.
        query_index = torch.arange(past, total, device=hidden.device)[:, None]  # (S, 1)
        key_index = torch.arange(total, device=hidden.device)[None, :]  # (1, T)
        visible = (key_index <= query_index) & (attention_mask.bool()[:, None, :] | (key_index == query_index))
        mask = visible[:, None]  # (B, 1, S, T) bool, True = attend

        cos = sin = None
        if self.config.position_embedding == "rope":
            cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_base, hidden.dtype)
        else:
            hidden = hidden + self.embed_positions(position_ids)
        hidden = self.dropout(hidden)
        for layer in self.layers:
            hidden = layer(hidden, mask, cos, sin, past_key_values=past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       past_key_values=past_key_values if use_cache else None)


class PicoTransformerForCausalLM(PicoTransformerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # active when config.tie_word_embeddings

    def __init__(self, config: PicoTransformerConfig):
        super().__init__(config)
        self.model = PicoTransformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[Cache] = None,
                use_cache: bool = False, labels: Optional[Tensor] = None,
                logits_to_keep: Union[int, Tensor] = 0, inputs_embeds: Optional[Tensor] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, S', V) for the kept positions; ``past_key_values`` is the updated ``DynamicCache``."""
        past_key_values = _cache_argument(past_key_values, kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds)
        logits = self.lm_head(_keep_last(out.last_hidden_state, logits_to_keep))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


# ---------------------------------------------------------------------------------------------------------------
# pico_lstm
# ---------------------------------------------------------------------------------------------------------------
@strict
class PicoLSTMConfig(PreTrainedConfig):
    """Configuration of :class:`PicoLSTMForCausalLM`: ``num_hidden_layers`` LSTM layers of width ``hidden_size``
    (also the embedding size, so the head can be tied to the embedding); ``dropout`` applies to the embeddings,
    between layers and before the head."""

    model_type = "pico_lstm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 1024
    hidden_size: int = 256
    num_hidden_layers: int = 2
    dropout: Union[int, float] = 0.0
    initializer_range: Union[int, float] = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None

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
        past_key_values = _cache_argument(past_key_values, kwargs)
        batch, length = input_ids.shape
        x = self.dropout(self.embed_tokens(input_ids))  # (B, S, H)
        if _is_empty_cache(past_key_values):
            state = self.initial_state(batch, x.device, x.dtype)
        elif isinstance(past_key_values, PicoLSTMState):
            state = past_key_values
        else:
            raise TypeError(f"pico_lstm continues from a PicoLSTMState, got {type(past_key_values).__name__}")
        mask = _new_token_mask(attention_mask, input_ids)  # (B, S)
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
            order, lengths, counts = _real_tokens_first(mask)
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
        logits = self.lm_head(self.dropout(_keep_last(hidden, logits_to_keep)))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        new_state = PicoLSTMState(torch.cat(h_n), torch.cat(c_n)) if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=new_state)


# ---------------------------------------------------------------------------------------------------------------
# pico_kgram
# ---------------------------------------------------------------------------------------------------------------
@strict
class PicoKGramConfig(PreTrainedConfig):
    """Configuration of :class:`PicoKGramForCausalLM`.

    The last ``context_size`` tokens' embeddings (``embedding_size`` each) are concatenated and projected to
    ``hidden_size`` with ``hidden_act`` (Bengio et al.'s hidden layer); ``num_hidden_layers`` residual blocks
    (Linear + ``hidden_act``, width ``hidden_size``) follow, then the output layer. ``num_hidden_layers=0`` is the
    original one-hidden-layer model.
    """

    model_type = "pico_kgram"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 1024
    context_size: int = 4
    embedding_size: int = 32
    hidden_size: int = 256
    num_hidden_layers: int = 1
    hidden_act: str = "tanh"  # tanh | gelu | relu | silu
    dropout: Union[int, float] = 0.0
    initializer_range: Union[int, float] = 0.02
    tie_word_embeddings: bool = False  # no tying: the head and the embedding differ in width in general
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None

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
        tokens: (B, context_size - 1) the last real tokens of each row, oldest first; -1 where the sequence has
            fewer (the learned "empty" embedding is used there).
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
        past_key_values = _cache_argument(past_key_values, kwargs)
        k = self.config.context_size
        batch, length = input_ids.shape
        if _is_empty_cache(past_key_values):
            past = torch.full((batch, k - 1), -1, dtype=torch.long, device=input_ids.device)
        elif isinstance(past_key_values, PicoKGramCache):
            past = past_key_values.tokens
        else:
            raise TypeError(f"pico_kgram continues from a PicoKGramCache, got {type(past_key_values).__name__}")
        mask = _new_token_mask(attention_mask, input_ids)
        order, lengths, counts = _real_tokens_first(mask)
        # [empty, cached k-1 tokens, the real tokens in order, padding]; window i holds k tokens ending at column
        # i + k - 1, i.e. the context after i real tokens of this call (window 0: the cached context alone).
        stream = torch.cat([past.new_full((batch, 1), -1), past, input_ids.gather(1, order)], dim=1)  # (B, k + S)
        windows = stream.unfold(1, k, 1)  # (B, S + 1, k)
        kept = _keep_last(counts, logits_to_keep)  # (B, S')
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


# ---------------------------------------------------------------------------------------------------------------
# Registration with the Auto classes
# ---------------------------------------------------------------------------------------------------------------
for _config, _model in ((PicoTransformerConfig, PicoTransformerForCausalLM), (PicoLSTMConfig, PicoLSTMForCausalLM),
                        (PicoKGramConfig, PicoKGramForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
AutoModel.register(PicoTransformerConfig, PicoTransformerModel, exist_ok=True)

PICO_MODEL_TYPES = ("pico_transformer", "pico_lstm", "pico_kgram")

__all__ = ["PICO_MODEL_TYPES", "PicoKGramCache", "PicoKGramConfig", "PicoKGramForCausalLM", "PicoLSTMConfig",
           "PicoLSTMForCausalLM", "PicoLSTMState", "PicoTransformerConfig", "PicoTransformerForCausalLM",
           "PicoTransformerModel", "causal_lm_loss"]
