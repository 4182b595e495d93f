"""KV-cached batched sampling for decoder-only models: the hot loop of on-policy distillation and RL.

Shape legend used throughout: B batch, P prompt length, N new tokens, T total length (P + N), V vocab.

Prompts are left-padded so that every sequence's next token sits in the last column; position ids come from
the attention mask, so a prompt is continued identically whether it is alone or padded inside a batch. One
forward pass encodes the prompts, then each step feeds only the newest token against the KV cache.

Log-probs are recorded from ``log_softmax(logits / temperature)`` of the full distribution, *before* top-k /
top-p filtering (TRL / OpenRLHF convention): filtering only decides which token is drawn, and the recorded
value then equals what ``sequence_logprobs`` recomputes on the returned sequences, which is what importance
ratios and KL terms in RL need.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from transformers import DynamicCache

from lit_distill.losses.logprobs import token_logprobs


@dataclass
class Rollout:
    """A batch of prompts and their sampled completions.

    Attributes:
        sequences: (B, P + N) left-padded prompt followed by the completion; positions after a sequence's EOS
            hold ``pad_token_id``.
        attention_mask: (B, P + N) 1 on real prompt tokens and on completion tokens up to and including EOS.
        completion_mask: (B, N) 1 on generated tokens up to and including EOS (so ``pad == eos`` never masks
            the real EOS).
        logprobs: (B, N) fp32 log-prob of each sampled token under ``log_softmax(logits / temperature)``
            before top-k / top-p filtering; 0 where masked.
        truncated: (B,) bool, True where no EOS was produced within ``max_new_tokens``.
        prompt_length: P.
    """

    sequences: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    logprobs: Tensor
    truncated: Tensor
    prompt_length: int

    @property
    def completions(self) -> Tensor:
        """(B, N) the generated tokens (pad after EOS)."""
        return self.sequences[:, self.prompt_length:]

    @property
    def completion_lengths(self) -> Tensor:
        """(B,) number of generated tokens, EOS included."""
        return self.completion_mask.sum(-1)


def left_pad(token_ids: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Stack prompts of different lengths, padding on the left.

    Args:
        token_ids: B non-empty lists of token ids.
        pad_token_id: id written into the padding.

    Returns:
        input_ids (B, P) and attention_mask (B, P), where P is the longest prompt.
    """
    if any(len(ids) == 0 for ids in token_ids):
        raise ValueError("token_ids: every prompt needs at least one token to condition on")
    length = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), length), pad_token_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)  # (B, P)
    for row, ids in enumerate(token_ids):
        input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids):] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position of each token among its sequence's real tokens.

    Args:
        attention_mask: (B, T) 1 on real tokens, 0 on padding.

    Returns:
        (B, T) ``cumsum(mask) - 1``, clamped at 0 on the left padding (which is masked anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf.

    Args:
        logits: (B, V) temperature-scaled fp32 logits.
        top_k: keep the k largest logits; 0 disables.
        top_p: keep the smallest set of tokens whose probability mass reaches ``top_p``; 1 disables.

    Returns:
        (B, V) filtered logits; the most likely token always survives.
    """
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass strictly before it already reaches top_p; the first token is never dropped.
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _logits_to_keep_kwargs(model, n: int) -> dict:
    """``{"logits_to_keep": n}`` when the model's forward accepts it (HF models), else ``{}``.

    Computing only the needed positions avoids a (B, P, V) logits tensor over the whole prompt.
    """
    forward = getattr(model, "forward", model)
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(forward).parameters else {}


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int,
             eos_token_id: Union[int, Sequence[int]], pad_token_id: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, do_sample: bool = True,
             generator: Optional[torch.Generator] = None) -> Rollout:
    """Complete a batch of left-padded prompts with a KV cache.

    The model's train/eval mode is left as the caller set it: RL and distillation callers should put it in
    eval mode so that dropout does not make the sampling policy differ from the one that is scored.

    Args:
        model: decoder-only model with the HF calling convention (``input_ids``, ``attention_mask``,
            ``position_ids``, ``past_key_values``, ``use_cache``) returning ``.logits`` (B, T, V) and
            ``.past_key_values``.
        input_ids: (B, P) left-padded prompts.
        attention_mask: (B, P) 1 on real prompt tokens.
        max_new_tokens: at most N tokens are generated; generation stops earlier once every sequence has
            produced EOS, and N is then the longest completion.
        eos_token_id: one id or several ids that end a sequence (none: always generate ``max_new_tokens``).
        pad_token_id: id written after a sequence's EOS.
        temperature: divides the logits before sampling; the recorded log-probs use it too.
        top_k: sample among the k most likely tokens; 0 disables.
        top_p: nucleus sampling mass in (0, 1]; 1 disables.
        do_sample: False for greedy argmax decoding (top-k / top-p are then irrelevant); log-probs are still
            reported under ``softmax(logits / temperature)``.
        generator: random generator of ``torch.multinomial`` (e.g. seeded per rank), on the model's device.

    Returns:
        A ``Rollout``; its log-probs are those of the unfiltered tempered distribution, so they match
        ``sequence_logprobs(model, rollout.sequences, rollout.attention_mask, P, temperature)``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           dtype=torch.long, device=input_ids.device)
    prompt_length = input_ids.size(1)

    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), past_key_values=DynamicCache(),
                use_cache=True, **_logits_to_keep_kwargs(model, 1))
    logits, cache = out.logits[:, -1], out.past_key_values  # (B, V)
    next_position = attention_mask.sum(-1, keepdim=True)  # (B, 1) position of the first new token
    finished = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)  # (B,)
    tokens, alive_masks, logprobs = [], [], []
    for step in range(max_new_tokens):
        if do_sample:
            scaled = _filter_logits(logits.float() / temperature, top_k, top_p)  # (B, V)
            next_tokens = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)
        else:
            next_tokens = logits.argmax(-1)  # (B,)
        alive = ~finished  # (B,) this step's token is real (EOS included) only where not yet finished
        tokens.append(next_tokens.masked_fill(finished, pad_token_id))
        logprobs.append(token_logprobs(logits, next_tokens, temperature).masked_fill(finished, 0.0))
        alive_masks.append(alive)
        finished = finished | torch.isin(next_tokens, eos_ids)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, alive[:, None].to(attention_mask.dtype)], dim=1)  # (B, T)
        out = model(input_ids=tokens[-1][:, None], attention_mask=attention_mask, position_ids=next_position,
                    past_key_values=cache, use_cache=True)
        logits, cache = out.logits[:, -1], out.past_key_values  # (B, V)
        next_position = next_position + alive[:, None]

    completion_mask = torch.stack(alive_masks, dim=1).to(attention_mask.dtype)  # (B, N)
    sequences = torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)  # (B, P + N)
    return Rollout(sequences=sequences,
                   attention_mask=torch.cat([attention_mask[:, :prompt_length], completion_mask], dim=1),
                   completion_mask=completion_mask, logprobs=torch.stack(logprobs, dim=1),  # (B, N)
                   truncated=~finished, prompt_length=prompt_length)


def sequence_logprobs(model, sequences: Tensor, attention_mask: Tensor, prompt_length: int,
                      temperature: float = 1.0) -> Tensor:
    """Log-probs of the completion tokens from one fresh forward pass (differentiable when grad is enabled).

    Args:
        model: decoder-only model with the HF calling convention.
        sequences: (B, T) left-padded prompts followed by completions (e.g. ``Rollout.sequences``).
        attention_mask: (B, T) 1 on real tokens.
        prompt_length: P; tokens from position P on are scored.
        temperature: the log-probs are those of ``softmax(logits / temperature)``.

    Returns:
        (B, N) fp32 log-probs with N = T - P; 0 where ``attention_mask`` is 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_new = sequences.size(1) - prompt_length
    # Position t's logits predict token t + 1, so the N completion tokens need the last N + 1 positions.
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask),
                   **_logits_to_keep_kwargs(model, num_new + 1)).logits[:, -num_new - 1:-1]  # (B, N, V)
    logprobs = token_logprobs(logits, sequences[:, prompt_length:], temperature)  # (B, N)
    return logprobs.masked_fill(attention_mask[:, prompt_length:] == 0, 0.0)
