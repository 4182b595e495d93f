"""Score completions with a reward model trained by ``RewardModule``."""

from __future__ import annotations

import torch

from lit_distill.data.collate import pad_right, tokenize, tokenize_completion
from lit_distill.models.heads import final_hidden_states
from lit_distill.models.reward_model import load_reward_model
from lit_distill.rewards.base import Reward, fit_pair, frozen


class RewardModelScore(Reward):
    """The scalar score a trained reward model gives prompt + completion.

    The sequence is encoded as ``RewardModule`` saw its training pairs: prompt and completion tokenised
    separately, the completion followed by EOS, concatenated and right-padded; the score is read at the last
    real token (the EOS). Pairs longer than ``max_length`` keep the completion's first ``max_length − 1`` tokens
    and the end of the prompt.

    Args:
        path: directory written by ``RewardModule.save_pretrained`` (backbone + ``score_head.pt``).
        batch_size: pairs scored per forward pass.
        max_length: longest prompt + completion in tokens.
    """

    def __init__(self, path: str, batch_size: int = 8, max_length: int = 1024):
        super().__init__()
        backbone, head, self.tokenizer = load_reward_model(path)
        self.backbone, self.head = frozen(backbone), frozen(head)
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        sequences = []
        for prompt, completion in zip(prompts, completions):
            prompt_ids, completion_ids = fit_pair(tokenize(self.tokenizer, prompt),
                                                  tokenize_completion(self.tokenizer, completion), self.max_length)
            sequences.append(prompt_ids + completion_ids)
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start:start + self.batch_size]
            input_ids = pad_right(batch, self.tokenizer.pad_token_id).to(self.device)  # (b, T)
            attention_mask = pad_right([[1] * len(ids) for ids in batch], 0).to(self.device)  # (b, T)
            hidden = final_hidden_states(self.backbone, input_ids, attention_mask)  # (b, T, H)
            scores += self.head.score(hidden, attention_mask).tolist()
        return scores
