"""Self-distillation reward: how likely a frozen model finds the completion, given the prompt."""

from __future__ import annotations

import math
from typing import Literal

import torch

from lit_distill.data.collate import pad_right, tokenize
from lit_distill.models.loading import ModelSpec, build_model, load_tokenizer
from lit_distill.rewards.base import Reward, fit_pair, frozen
from lit_distill.rollout import left_pad, sequence_logprobs

KINDS = ("nll", "perplexity")


class InverseLoss(Reward):
    """The negated language-model loss of the completion under a frozen model.

    With mean NLL = −(1/N) Σ_t log p(c_t | prompt, c_<t) over the N completion tokens:

    * ``kind="nll"``: reward = −NLL, in (−inf, 0];
    * ``kind="perplexity"``: reward = −exp(NLL), in (−inf, −1]; unbounded, so a mean NLL above ~88 nats
      overflows fp32 and :class:`WeightedRewards` reports it (prefer ``nll`` for RL).

    Prompt and completion are tokenised separately and concatenated (no BPE merge across the boundary, the
    tokens the policy generated); no EOS is appended, since a decoded completion does not say whether it ended
    with EOS or was truncated. Pairs longer than ``max_length`` keep the completion's first ``max_length − 1``
    tokens and the end of the prompt.

    An empty completion has no token to score and gets ``empty_reward``; by default the reward of a model no
    better than a uniform guess over the vocabulary (NLL = log V), so emptiness is never a shortcut to a high
    reward.

    Args:
        model: the frozen scorer (e.g. the teacher, or the policy's initial weights).
        kind: ``"nll"`` or ``"perplexity"``.
        max_length: longest prompt + completion in tokens.
        batch_size: pairs scored per forward pass.
        empty_reward: reward of an empty completion; ``None``: −log V (nll) or −V (perplexity).
    """

    def __init__(self, model: ModelSpec, kind: Literal["nll", "perplexity"] = "nll", max_length: int = 1024,
                 batch_size: int = 8, empty_reward: float | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"InverseLoss: kind must be one of {KINDS}, got '{kind}'")
        self.tokenizer = load_tokenizer(model.tokenizer or model.name_or_path)
        self.model = frozen(build_model(model, self.tokenizer))
        self.kind = kind
        self.max_length = max_length
        self.batch_size = batch_size
        uniform_nll = math.log(len(self.tokenizer))
        self.empty_reward = empty_reward if empty_reward is not None else self.reward(uniform_nll)

    def reward(self, nll: float) -> float:
        return -nll if self.kind == "nll" else -math.exp(nll)

    def mean_nll(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[float]:
        """Mean NLL of each non-empty completion after its prompt, from one padded forward pass.

        Prompts are left-padded and completions right-padded, so that all completions start at column P (the
        layout ``sequence_logprobs`` scores); position ids come from the mask.
        """
        prompts, prompt_mask = left_pad(prompt_ids, self.tokenizer.pad_token_id)  # (B, P)
        completions = pad_right(completion_ids, self.tokenizer.pad_token_id)  # (B, N)
        completion_mask = pad_right([[1] * len(ids) for ids in completion_ids], 0)  # (B, N)
        sequences = torch.cat([prompts, completions], dim=1).to(self.device)  # (B, P + N)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).to(self.device)
        logprobs = sequence_logprobs(self.model, sequences, attention_mask, prompts.size(1))  # (B, N), 0 on padding
        return (-logprobs.double().sum(-1) / completion_mask.to(self.device).sum(-1)).tolist()

    @torch.no_grad()
    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        pairs = [fit_pair(tokenize(self.tokenizer, prompt), tokenize(self.tokenizer, completion), self.max_length)
                 for prompt, completion in zip(prompts, completions)]
        rewards = [self.empty_reward] * len(pairs)
        scored = [i for i, (_, completion_ids) in enumerate(pairs) if completion_ids]
        for start in range(0, len(scored), self.batch_size):
            rows = scored[start:start + self.batch_size]
            nlls = self.mean_nll([pairs[i][0] for i in rows], [pairs[i][1] for i in rows])
            for row, nll in zip(rows, nlls):
                rewards[row] = self.reward(nll)
        return rewards
