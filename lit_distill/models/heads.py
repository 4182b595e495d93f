"""Scalar heads on causal LMs (reward models, value heads)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lit_distill.rollout import position_ids_from_mask


# Attention implementations for which transformers' own models mask packed rows from their position ids.
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_packing_support(model: nn.Module) -> None:
    """Raise unless ``model`` keeps packed examples apart given only their position ids (``attention_inputs``):
    transformers' own model classes do, with an attention in :data:`PACKED_ATTENTION`; any other model (the pico
    models, custom code) would let every token attend across examples, silently.

    Raises:
        ValueError: naming the model class and its attention implementation.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    attention = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if not type(base).__module__.startswith("transformers.models.") or attention not in PACKED_ATTENTION:
        raise ValueError(f"packed batches need one of transformers' own models with attention in "
                         f"{PACKED_ATTENTION}, which mask attention by the per-example position ids; "
                         f"{type(base).__name__} (attention {attention!r}) would attend across the packed examples. "
                         "Set packing: false in the data config")


def attention_inputs(model: nn.Module, attention_mask: torch.Tensor,
                     position_ids: Optional[torch.Tensor] = None) -> dict:
    """The attention arguments of a training or scoring forward.

    Without ``position_ids``: the (B, T) mask and position ids counted from it, so left padding is handled. With
    ``position_ids`` (packed rows, several examples per row, the ids restarting at 0 for each): those ids and no
    mask, from which transformers (v5 ``create_causal_mask``) builds a block-diagonal causal mask for sdpa, eager
    and flex attention, or varlen offsets for flash attention, so no token attends across examples. Padding at a
    packed row's end is attended by nothing real (causal), so dropping the mask is exact there too.

    Raises:
        ValueError: ``position_ids`` are given to a model that would not honour them (``check_packing_support``).
    """
    if position_ids is None:
        return {"attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
    check_packing_support(model)
    return {"attention_mask": None, "position_ids": position_ids}


class _HeadReached(Exception):
    """Raised by the capturing hook once the output head's input is captured, to end the forward there."""


def _forward_capturing_head_input(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                  stop_at_head: bool, position_ids: Optional[torch.Tensor] = None,
                                  **kwargs) -> tuple[object, torch.Tensor]:
    """The model's output (None when stopped at the head) and the hidden states entering its output head."""
    captured = []

    def capture(module, args):
        captured.append(args[0])
        if stop_at_head:
            raise _HeadReached

    output = None
    handle = model.get_output_embeddings().register_forward_pre_hook(capture)
    try:
        output = model(input_ids=input_ids, **attention_inputs(model, attention_mask, position_ids), use_cache=False,
                       **kwargs)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__}'s forward never reached its output head "
                           "(get_output_embeddings()): no hidden states to read")
    return output, captured[0]


def forward_with_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               **kwargs) -> tuple[object, torch.Tensor]:
    """One forward pass returning the model's output and the (B, T', H) hidden states entering its output head
    (T' = T, or fewer positions when ``kwargs`` holds ``logits_to_keep``).

    Captured with a pre-hook on ``get_output_embeddings()``, so it works for any causal LM with an output head
    (HF models, peft-wrapped models, the pico models) without knowing where its decoder lives. Position ids come
    from the mask, so left padding is handled; no KV cache is built (see ``causal_lm_logits``).
    """
    return _forward_capturing_head_input(model, input_ids, attention_mask, stop_at_head=False, **kwargs)


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T, H) hidden states entering the model's output head, without running the head (``position_ids``: packed
    rows, see ``attention_inputs``).

    A reward model needs no (B, T, V) logits: computing them would be a wasted matmul (a few percent of the forward
    at a 1k vocabulary, about a third of it at SmolLM2's 49k) and a logits-sized activation. The same pre-hook as
    ``forward_with_hidden_states`` captures the head's input and then stops the forward; the head is the last layer
    of a causal LM, so nothing else is skipped.
    """
    return _forward_capturing_head_input(model, input_ids, attention_mask, stop_at_head=True,
                                         position_ids=position_ids)[1]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,) index of each row's last real token, whatever the padding side.

    Taken from the mask, never by searching for the pad id: with pad == eos that search would stop at the real
    EOS (or before it).
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return (positions * attention_mask).argmax(-1)


class ScalarHead(nn.Linear):
    """hidden -> 1, initialised small (std 1/sqrt(H + 1), zero bias) so initial scores are near 0 and the
    Bradley–Terry loss starts near log 2 (as in InstructGPT / TRL reward models)."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.bias)

    def score(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H), (B, T) -> (B,) fp32 score read at the last real token."""
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        last = hidden_states[rows, last_token_index(attention_mask)]  # (B, H)
        return self(last.to(self.weight.dtype)).squeeze(-1).float()
