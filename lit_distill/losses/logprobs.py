"""Log-probabilities of given tokens under a model's logits: the inputs of preference and RL losses.

Shapes: B batch, T time (sequence positions), V vocab.

Results are in fp32 (float64 for float64 inputs). Half-precision logits are upcast a chunk of rows at a time,
so no fp32 copy of a whole (B, T, V) tensor is ever made, in forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Logits upcast at once: 2**24 elements, 64 MiB in fp32 (a few hundred rows at LLM vocab sizes).
_CHUNK_ELEMENTS = 2 ** 24


def _chunk_token_logprobs(logits: Tensor, tokens: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """(n, V), (n,) -> (n,) log-probs of one chunk of rows."""
    logits = logits.to(dtype)  # (n, V) upcast
    if temperature != 1.0:
        logits = logits / temperature
    # gather − logsumexp: the (n, V) log_softmax is never formed.
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-prob of ``tokens`` under ``softmax(logits / temperature)``.

    Rows are processed in chunks of about ``_CHUNK_ELEMENTS`` logits; with gradients enabled each chunk runs
    under activation checkpointing, so backward too upcasts one chunk at a time. A non-contiguous ``logits``
    whose leading dims cannot be flattened as a view (e.g. a ``logits[:, :-1]`` slice) is copied once in its
    own dtype.

    Args:
        logits: (..., V) raw logits, e.g. (B, T, V), in any float dtype.
        tokens: (...) token ids, valid indices into V everywhere (replace padding labels first).
        temperature: softmax temperature > 0.

    Returns:
        (...) log-probs in fp32 (float64 for float64 logits); differentiable w.r.t. ``logits``.

    Raises:
        ValueError: if temperature <= 0 or the shapes do not match.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} must share the leading "
                         "shape")
    dtype = torch.promote_types(torch.float32, logits.dtype)
    vocab = logits.size(-1)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    flat_logits, flat_tokens = logits.reshape(-1, vocab), tokens.reshape(-1)  # (N, V), (N,)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    chunks = [
        checkpoint(_chunk_token_logprobs, x, y, temperature, dtype, use_reentrant=False) if recompute
        else _chunk_token_logprobs(x, y, temperature, dtype)
        for x, y in zip(flat_logits.split(rows), flat_tokens.split(rows))
    ]
    return torch.cat(chunks).reshape(tokens.shape)


def sequence_logprobs_from_logits(logits: Tensor, labels: Tensor,
                                  ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed log-prob of each sequence's labelled tokens, from causal-LM logits.

    Labels follow the HF convention (aligned with ``input_ids``); the shift happens here: ``logits[:, t]``
    predicts ``labels[:, t + 1]``, so ``labels[:, 0]`` is never scored. Divide the sum by the count for the
    per-token mean (e.g. IPO's length-normalised log-probs).

    Args:
        logits: (B, T, V) logits of a causal LM over the full sequence.
        labels: (B, T) token ids; ``ignore_index`` masks a position out (prompt, padding).
        ignore_index: label value of masked positions.

    Returns:
        ``(logps, num_tokens)``: (B,) fp32 sum of log-probs over unmasked positions (0 for a fully masked
        row) and (B,) int64 number of unmasked positions.

    Raises:
        ValueError: if the shapes are not (B, T, V) and (B, T).
    """
    if logits.dim() != 3 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be (B, T, V) and "
                         "(B, T)")
    mask = labels[:, 1:] != ignore_index  # (B, T - 1)
    # ignore_index is no valid index for gather: score masked positions against token 0, then drop them.
    targets = labels[:, 1:].masked_fill(~mask, 0)  # (B, T - 1)
    # Scoring the full logits against targets padded with a dummy last column keeps token_logprobs on the
    # contiguous (B, T, V) tensor: a logits[:, :-1] slice would be copied whole.
    logps = token_logprobs(logits, F.pad(targets, (0, 1)))[:, :-1]  # (B, T - 1)
    return logps.masked_fill(~mask, 0.0).sum(-1), mask.sum(-1)
