"""``pico_transformer``: a pre-norm decoder-only transformer (Llama-style, small).

RMSNorm, rotary (``position_embedding="rope"``) or learned (``"learned"``) positions taken from ``position_ids``
(so left padding is handled), causal self-attention through ``F.scaled_dot_product_attention``, SwiGLU
(``mlp="swiglu"``) or GELU (``"gelu"``) MLP, optionally tied embeddings. The cache is a ``transformers.DynamicCache``
(keys / values per layer); gradient checkpointing is supported.

Imports only torch, transformers, huggingface_hub and ``.common``: ``save_pretrained`` copies this file and
``common.py`` next to the weights, for loading without lit_distill (see the package docstring).

Shapes: B batch rows, S new tokens, T = past + S positions, H hidden size, h / kv query / key-value heads, d head
dimension, V vocabulary size.
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .common import PicoConfig, cache_argument, causal_lm_loss, keep_last


@strict
class PicoTransformerConfig(PicoConfig):
    """Configuration of :class:`PicoTransformerForCausalLM`.

    ``intermediate_size`` defaults to ``4 * hidden_size`` for the GELU MLP and to ``8/3 * hidden_size`` (rounded up
    to a multiple of 8) for SwiGLU, which keeps both at about the same parameter count. ``num_key_value_heads``
    below ``num_attention_heads`` gives grouped-query attention. ``max_position_embeddings`` sizes the learned
    position table (rotary positions have no limit).
    """

    model_type = "pico_transformer"

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


def sdpa_mask(attention_mask: Optional[Tensor], past: int, length: int, device: torch.device) -> Optional[Tensor]:
    """The attention mask of the S new queries (positions past .. T - 1) over the T keys, for SDPA; or None.

    None when no row is padded and either nothing is cached (plain causal attention, SDPA's ``is_causal``) or
    there is one query (it sees every key): SDPA can then use its flash kernel, which takes no mask. This costs
    one device sync (``attention_mask.all()``) when a mask is given.

    Otherwise (B or 1, 1, S, T) bool, True = attend: query i sees key j <= past + i whose mask is 1. It always sees
    itself, so a padded query has a finite (meaningless) output instead of the NaN of an all-masked softmax row;
    real queries never see padded keys, so padding cannot leak into real positions.

    Args:
        attention_mask: (B, T) 1 on real tokens, or None (no padding).
    """
    if (past == 0 or length == 1) and (attention_mask is None or bool(attention_mask.all())):
        return None
    total = past + length
    real = (attention_mask.bool() if attention_mask is not None
            else torch.ones(1, total, dtype=torch.bool, device=device))  # several new tokens after a cache
    query_index = torch.arange(past, total, device=device)[:, None]  # (S, 1)
    key_index = torch.arange(total, device=device)[None, :]  # (1, T)
    visible = (key_index <= query_index) & (real[:, None, :] | (key_index == query_index))  # (B, S, T)
    return visible[:, None]


class PicoRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_cos_sin(position_ids: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(B, 1, S, d) cos and sin of the rotary angles at ``position_ids`` (B, S), computed in fp32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids[..., None].float() * inv_freq  # (B, S, d / 2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, S, d)
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

    def forward(self, x: Tensor, mask: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
                past_key_values: Optional[Cache] = None) -> Tensor:
        """(B, S, H) -> (B, S, H); ``mask`` is :func:`sdpa_mask`'s."""
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
        # No mask: either S == T (causal) or S == 1 (sees all keys; is_causal would align it with key 0).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and length > 1,
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

    def forward(self, hidden: Tensor, mask: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
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
        """(B, S) ``input_ids`` or (B, S, H) ``inputs_embeds`` -> normed hidden states (B, S, H).

        ``attention_mask`` (B, T) covers the cached and the new tokens; ``position_ids`` (B, S) default to the
        count of real tokens before each one.
        """
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
        if attention_mask is not None and attention_mask.size(1) == length and past:
            raise ValueError("with a cache, attention_mask must cover the cached tokens and the new ones")
        if attention_mask is not None and attention_mask.size(1) != total:
            raise ValueError(f"attention_mask has {attention_mask.size(1)} columns, expected {total}")
        if position_ids is None and attention_mask is None:
            position_ids = torch.arange(past, total, device=hidden.device).expand(batch, -1)  # (B, S)
        elif position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        mask = sdpa_mask(attention_mask, past, length, hidden.device)

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
        past_key_values = cache_argument(past_key_values, kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds)
        logits = self.lm_head(keep_last(out.last_hidden_state, logits_to_keep))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
