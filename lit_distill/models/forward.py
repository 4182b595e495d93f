"""The forward passes every trainer, evaluator and teacher-cache builder shares."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from lit_distill.data.collate import IGNORE_INDEX
from lit_distill.losses.logprobs import token_logprobs
from lit_distill.models.heads import attention_inputs, final_hidden_states

# Config fields with which an HF model changes its output head's result before returning it as logits (Gemma 2/3
# soft-capping, Cohere's scale, Granite's divisor, Falcon-H1's multiplier). A model that sets one is scored through
# its own forward instead of through the head applied to its hidden states.
LOGIT_POSTPROCESSING_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits (B, T, V) with position ids derived from the mask, so left padding is handled, or the given
    ``position_ids`` of packed rows (see ``models.heads.attention_inputs``).

    ``use_cache=False``: a training or scoring pass reads no KV cache afterwards, and HF models would otherwise fill
    a fresh ``DynamicCache`` (Python work per layer, and every layer's keys and values kept alive with the output).
    """
    return model(input_ids=input_ids, **attention_inputs(model, attention_mask, position_ids), use_cache=False).logits


def head_output_is_logits(model: nn.Module) -> bool:
    """Whether the model's logits are its output head applied to the head's input, with nothing after it."""
    config = getattr(model, "config", None)
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING_FIELDS)


class LabelledLogits(NamedTuple):
    """Logits at the positions whose next token is a label, and what selects them.

    ``logits``: (N, V), row n predicting ``targets[n]``; ``targets``: (N,) token ids; ``mask``: (B, T − 1) bool,
    True at position t when label t + 1 is scored (N = ``mask.sum()``), rows in ``mask.nonzero()`` order.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) -> (B,) sum over each sequence's labelled positions (0 for a sequence with none)."""
        return values.new_zeros(self.mask.shape).masked_scatter(self.mask, values).sum(-1)


def labelled_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX, position_ids: Optional[torch.Tensor] = None) -> LabelledLogits:
    """The causal LM's logits only where they are scored: the output head runs on the N labelled positions.

    Prompt tokens and padding carry no label in SFT, DPO or a corrective answer, yet a full forward computes their
    (B, T, V) logits: at SmolLM2's 49k vocabulary the head is about a fifth of the model's FLOPs, and its logits the
    largest activation. Here the forward stops at the head's input (``final_hidden_states``), the labelled rows are
    gathered, and only they go through the head. The result equals ``causal_lm_logits`` at those positions; a model
    that post-processes its head's output (``LOGIT_POSTPROCESSING_FIELDS``) is run whole and then indexed.

    Args:
        labels: (B, T) HF-convention labels aligned with ``input_ids`` (shifted here), ``ignore_index`` masked.
        position_ids: (B, T) per-example position ids of packed rows (``data.packing``), or None.
    """
    mask = labels[:, 1:] != ignore_index  # (B, T - 1)
    targets = labels[:, 1:][mask]  # (N,)
    if not head_output_is_logits(model):
        logits = causal_lm_logits(model, input_ids, attention_mask, position_ids)
        return LabelledLogits(logits[:, :-1][mask], targets, mask)
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)[:, :-1][mask]  # (N, H)
    return LabelledLogits(model.get_output_embeddings()(hidden), targets, mask)


def labelled_sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) fp32 summed log-prob of each sequence's labelled tokens and (B,) their count, as
    ``sequence_logprobs_from_logits(causal_lm_logits(...), labels)`` computes them, with the head on labelled
    positions only (``labelled_logits``)."""
    scored = labelled_logits(model, input_ids, attention_mask, labels)
    return scored.per_sequence(token_logprobs(scored.logits, scored.targets)), scored.mask.sum(-1)
