"""KV-cached batched sampling for decoder-only models: the hot loop of on-policy distillation and RL.

Shape legend used throughout: B batch, P prompt length, N new tokens, T total length (P + N), V vocab.

Prompts are left-padded so that every sequence's next token sits in the last column; position ids come from
the attention mask, so a prompt is continued identically whether it is alone or padded inside a batch. One
forward pass encodes the prompts, then each step feeds only the newest token against the KV cache.

Log-probs are recorded from ``log_softmax(logits / temperature)`` of the full distribution, *before* top-k /
top-p filtering (TRL / OpenRLHF convention): filtering only decides which token is drawn, and the recorded
value then equals what ``sequence_logprobs`` recomputes on the returned sequences, which is what importance
ratios and KL terms in RL need.

Speed (``python -m lit_distill.bench sampling``): everything sized by N is allocated once (the KV cache, see
``rollout.cache``, the attention mask and the output buffers) and written in place; tokens are drawn by inverse-CDF
sampling, which needs one random number per row where ``torch.multinomial`` draws one per vocabulary entry, and
the normaliser of that CDF gives the recorded log-prob without a second softmax; once half the rows of the batch
have finished, they leave it (with their cache rows), so short completions stop costing forward passes; on
accelerators, whether rows have finished is read back every few steps only (each read is a host-device sync).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor, nn

from lit_distill.losses.logprobs import token_logprobs
from lit_distill.rollout.cache import RolloutCache
from lit_distill.rollout.stopping import StopStringMatcher


class FinishReason(enum.IntEnum):
    """Why a completion ended (values of ``Rollout.finish_reason``)."""

    LENGTH = 0  # max_new_tokens reached without EOS or stop string: truncated
    EOS = 1  # an EOS token was generated (and kept)
    STOP = 2  # a stop string was completed (its last token kept)


@dataclass
class Rollout:
    """A batch of prompts and their sampled completions.

    Attributes:
        sequences: (B, P + N) left-padded prompt followed by the completion; positions after a sequence's end
            (EOS or stop string) hold ``pad_token_id``.
        attention_mask: (B, P + N) 1 on real prompt tokens and on completion tokens up to and including the end.
        completion_mask: (B, N) 1 on generated tokens up to and including the EOS or the token completing a stop
            string (so ``pad == eos`` never masks the real EOS).
        logprobs: (B, N) fp32 log-prob of each sampled token under ``log_softmax(logits / temperature)``
            before top-k / top-p filtering; 0 where masked.
        finish_reason: (B,) int64 ``FinishReason`` of each row: ``LENGTH`` (truncated), ``EOS`` or ``STOP``.
        prompt_length: P.
    """

    sequences: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    logprobs: Tensor
    finish_reason: Tensor
    prompt_length: int

    @property
    def completions(self) -> Tensor:
        """(B, N) the generated tokens (pad after the end)."""
        return self.sequences[:, self.prompt_length:]

    @property
    def completion_lengths(self) -> Tensor:
        """(B,) number of generated tokens, EOS included."""
        return self.completion_mask.sum(-1)

    @property
    def truncated(self) -> Tensor:
        """(B,) bool, True where neither EOS nor a stop string came within ``max_new_tokens``."""
        return self.finish_reason == FinishReason.LENGTH

    @property
    def stopped(self) -> Tensor:
        """(B,) bool, True where a stop string ended the completion."""
        return self.finish_reason == FinishReason.STOP


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


def logits_to_keep_kwargs(model, n: int) -> dict:
    """``{"logits_to_keep": n}`` when the model's forward accepts it (HF models, also under peft), else ``{}``.

    Computing only the needed positions avoids a (B, P, V) logits tensor over the whole prompt.
    """
    # peft's wrapper forwards unknown keyword arguments to the base model, whose signature is the one that counts.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base, "forward", base)
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(forward).parameters else {}


def _sample(logits: Tensor, temperature: float, top_k: int, top_p: float, do_sample: bool,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Draw each row's next token; also return its log-prob under the unfiltered tempered distribution.

    Sampling inverts the CDF of the (filtered) distribution at one uniform draw per row: ``x = (1 - u) * Z`` lies in
    (0, Z], so the first index whose cumulative mass reaches x has a nonzero probability and exists. The cumulative
    sum runs in float64, so even tokens with a probability far below fp32's resolution near 1 keep their exact share.

    Args:
        logits: (B, V) next-token logits in any float dtype.
        temperature, top_k, top_p, do_sample: as in :func:`generate`.
        generator: random generator on the logits' device.

    Returns:
        next_tokens (B,) int64 and their fp32 log-probs (B,) under ``log_softmax(logits / temperature)``.
    """
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    if not do_sample:
        next_tokens = scaled.argmax(-1)  # (B,)
        return next_tokens, token_logprobs(scaled, next_tokens)
    filtering = 0 < top_k < scaled.size(-1) or top_p < 1.0
    candidates = _filter_logits(scaled, top_k, top_p) if filtering else scaled  # (B, V)
    shift = scaled.amax(-1, keepdim=True)  # (B, 1) the top token always survives filtering
    cdf = (candidates - shift).exp_().cumsum(-1, dtype=torch.float64)  # (B, V) unnormalised
    uniform = torch.rand(cdf.size(0), 1, dtype=torch.float64, device=cdf.device, generator=generator)  # (B, 1)
    next_tokens = torch.searchsorted(cdf, (1 - uniform) * cdf[:, -1:]).squeeze(-1)  # (B,)
    # Without filtering, Z = cdf[:, -1] is the softmax normaliser: log p = logit - shift - log Z, no second pass.
    log_normaliser = (cdf[:, -1].log().float() + shift.squeeze(-1)) if not filtering else scaled.logsumexp(-1)
    return next_tokens, scaled.gather(-1, next_tokens[:, None]).squeeze(-1) - log_normaliser


def _finished_check_every(device: torch.device) -> int:
    """Decoding steps between reads of how many rows have finished (to stop, or to drop finished rows).

    A read waits for the device to catch up, so on accelerators it happens every 8 steps only (up to 7 steps may run
    after the last row finished; they are cut from the output); on the CPU it costs nothing and happens every step.
    """
    return 1 if device.type == "cpu" else 8


@dataclass
class _Rows:
    """Per-row generation state of the A rows in the model's batch (A = B until finished rows are dropped).

    Attributes:
        index: (A,) each row's index in the caller's batch.
        completions: (A, N) generated tokens, pad after the end.
        logprobs: (A, N) their log-probs, 0 after the end.
        mask: (A, P + N) attention mask of prompt and completion, written one column per step.
        finish_reason: (A,) ``FinishReason``.
        finished: (A,) bool, the row has ended.
        next_position: (A, 1) position id of the next token.
    """

    index: Tensor
    completions: Tensor
    logprobs: Tensor
    mask: Tensor
    finish_reason: Tensor
    finished: Tensor
    next_position: Tensor

    def select(self, keep: Tensor) -> _Rows:
        """The rows where ``keep`` (A,) bool is True."""
        return _Rows(*(getattr(self, f.name)[keep] for f in fields(self)))

    @staticmethod
    def gather(parts: list[_Rows]) -> _Rows:
        """All rows of ``parts`` back in the caller's order."""
        order = torch.cat([part.index for part in parts]).argsort()
        return _Rows(*(torch.cat([getattr(part, f.name) for part in parts])[order] for f in fields(_Rows)))


def _select_cache_rows(cache, keep: Tensor):
    """The cache restricted to the batch rows where ``keep`` (A,) bool is True; None if it cannot select rows.

    HF caches select in place through ``reorder_cache`` (returning None); pico LSTM / k-gram states return a copy.
    """
    if not hasattr(cache, "reorder_cache"):
        return None
    selected = cache.reorder_cache(keep.nonzero().flatten())
    return cache if selected is None else selected


@contextmanager
def generation_mode(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing off while generating, restored on exit.

    HF layers (and pico transformers) under gradient checkpointing in training mode drop ``use_cache`` and the
    cache, so every step would recompute the whole sequence; checkpointing saves nothing without gradients anyway.
    The per-module ``gradient_checkpointing`` flags are flipped and restored as they were, which also covers
    peft-wrapped models and ``every_n_layers`` patterns.
    """
    checkpointed = [module for module in model.modules() if getattr(module, "gradient_checkpointing", False) is True]
    for module in checkpointed:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in checkpointed:
            module.gradient_checkpointing = True


def seeded_generator(*parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded by a tuple of non-negative integers, e.g. ``(seed, rank, step)``: the seed hashes
    the tuple with NumPy's ``SeedSequence`` (built to derive independent streams from such tuples), so nearby tuples
    give unrelated streams, identically in every process."""
    if min(parts) < 0:
        raise ValueError(f"seed parts must be >= 0, got {parts}")
    state = np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def rollout_generator(seed: int, rank: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A random generator for one rank's rollouts at one training step.

    Data-parallel ranks share the prompt order but must draw different completions, and a run resumed at step s must
    redraw the samples of step s: hence :func:`seeded_generator` of ``(seed, rank, step)``.

    Args:
        seed: the run's seed (>= 0).
        rank: the data-parallel rank (>= 0), e.g. ``trainer.global_rank``.
        step: the training step (>= 0), e.g. ``trainer.global_step``.
        device: the device that samples (a CUDA generator for CUDA logits).

    Returns:
        A seeded ``torch.Generator`` on ``device``, for :func:`generate`'s ``generator``.
    """
    if min(seed, rank, step) < 0:
        raise ValueError(f"seed, rank and step must be >= 0, got {seed}, {rank}, {step}")
    return seeded_generator(seed, rank, step, device=device)


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int,
             eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, do_sample: bool = True,
             generator: torch.Generator | None = None, stop_strings: Sequence[str] = (),
             tokenizer=None) -> Rollout:
    """Complete a batch of left-padded prompts with a KV cache.

    The model's train/eval mode is left as the caller set it: RL and distillation callers should put it in
    eval mode so that dropout does not make the sampling policy differ from the one that is scored. Gradient
    checkpointing is switched off during the call (see :func:`generation_mode`).

    A row ends at its first EOS or at the token that completes a stop string; that token is kept (in
    ``completion_mask``, scored in ``logprobs``) and everything after it is padding, masked out. The token
    completing a stop string may carry text past the stop string's end: cut the decoded text if that matters.

    Args:
        model: decoder-only model with the HF calling convention (``input_ids``, ``attention_mask``,
            ``position_ids``, ``past_key_values``, ``use_cache``) returning ``.logits`` (B, T, V) and
            ``.past_key_values``; an HF ``Cache`` is used through its ``update``, other cache objects (pico
            LSTM / k-gram states) are passed back as the model returns them.
        input_ids: (B, P) left-padded prompts.
        attention_mask: (B, P) 1 on real prompt tokens.
        max_new_tokens: at most N tokens are generated; generation stops earlier once every sequence has
            ended, and N is then the longest completion.
        eos_token_id: one id or several ids that end a sequence (none: always generate ``max_new_tokens``).
        pad_token_id: id written after a sequence's end.
        temperature: divides the logits before sampling; the recorded log-probs use it too.
        top_k: sample among the k most likely tokens; 0 disables.
        top_p: nucleus sampling mass in (0, 1]; 1 disables.
        do_sample: False for greedy argmax decoding (top-k / top-p are then irrelevant); log-probs are still
            reported under ``softmax(logits / temperature)``.
        generator: random generator of the sampling (e.g. from :func:`rollout_generator`), on the model's device.
        stop_strings: strings that end a completion once its decoded text contains one (see
            ``rollout.stopping``: only a tail window of each unfinished row is decoded, once per step).
        tokenizer: decodes completions for ``stop_strings``; needed only with them.

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
    stop = StopStringMatcher(stop_strings, tokenizer) if stop_strings else None
    device = input_ids.device
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           dtype=torch.long, device=device)
    batch, prompt_length = input_ids.shape
    check_every = 1 if stop is not None else _finished_check_every(device)  # the stop check reads anyway
    rows = _Rows(index=torch.arange(batch, device=device),
                 completions=input_ids.new_full((batch, max_new_tokens), pad_token_id),
                 logprobs=torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device),
                 mask=torch.cat([attention_mask, attention_mask.new_zeros(batch, max_new_tokens)], dim=1),
                 finish_reason=torch.full((batch,), FinishReason.LENGTH, dtype=torch.long, device=device),
                 finished=torch.zeros(batch, dtype=torch.bool, device=device),
                 next_position=attention_mask.sum(-1, keepdim=True))
    done: list[_Rows] = []  # rows dropped from the batch once finished

    with generation_mode(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask),
                    past_key_values=RolloutCache(prompt_length + max_new_tokens), use_cache=True,
                    **logits_to_keep_kwargs(model, 1))
        cache = out.past_key_values
        for step in range(max_new_tokens):
            next_tokens, step_logprobs = _sample(out.logits[:, -1], temperature, top_k, top_p, do_sample,
                                                 generator)  # (A,), (A,)
            alive = ~rows.finished  # (A,) this step's token is real (its end included) only where not yet finished
            rows.completions[:, step] = next_tokens.masked_fill(rows.finished, pad_token_id)
            rows.logprobs[:, step] = step_logprobs.masked_fill(rows.finished, 0.0)
            rows.mask[:, prompt_length + step] = alive
            ended = alive & torch.isin(next_tokens, eos_ids)  # (A,)
            rows.finish_reason.masked_fill_(ended, FinishReason.EOS)
            if stop is not None:
                stopped = stop(rows.completions, step + 1, alive & ~ended)  # (A,)
                rows.finish_reason.masked_fill_(stopped, FinishReason.STOP)
                ended |= stopped
            rows.finished |= ended
            if step == max_new_tokens - 1:
                break
            if (step + 1) % check_every == 0:
                num_alive = int((~rows.finished).sum())
                if num_alive == 0:
                    break
                # Finished rows still cost a full forward each: once they are half the batch, drop them (one copy
                # of the cache per halving, so at most about two in all).
                selected = _select_cache_rows(cache, ~rows.finished) if num_alive <= len(rows.index) // 2 else None
                if selected is not None:
                    done.append(rows.select(rows.finished))
                    rows, cache = rows.select(~rows.finished), selected
                    alive = ~rows.finished
            out = model(input_ids=rows.completions[:, step:step + 1],
                        attention_mask=rows.mask[:, :prompt_length + step + 1], position_ids=rows.next_position,
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.next_position = rows.next_position + alive[:, None]

    rows = _Rows.gather(done + [rows])
    # The longest completion: the last step when a row is truncated, else where the last row ended (steps run past
    # it between finished checks are cut).
    length = int(rows.mask[:, prompt_length:].sum(-1).max())
    return Rollout(sequences=torch.cat([input_ids, rows.completions[:, :length]], dim=1),  # (B, P + N)
                   attention_mask=rows.mask[:, :prompt_length + length],
                   completion_mask=rows.mask[:, prompt_length:prompt_length + length],
                   logprobs=rows.logprobs[:, :length], finish_reason=rows.finish_reason, prompt_length=prompt_length)


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
                   **logits_to_keep_kwargs(model, num_new + 1)).logits[:, -num_new - 1:-1]  # (B, N, V)
    logprobs = token_logprobs(logits, sequences[:, prompt_length:], temperature)  # (B, N)
    return logprobs.masked_fill(attention_mask[:, prompt_length:] == 0, 0.0)
