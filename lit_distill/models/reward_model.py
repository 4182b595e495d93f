"""Load a reward model saved by ``RewardModule``: a causal-LM backbone (HF format) plus a scalar score head.

Lives in the model layer so that both the module that trains a reward model and the reward that scores with one
(``lit_distill.rewards.RewardModelScore``) depend on it, without the rewards importing a LightningModule.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_distill.models.heads import ScalarHead
from lit_distill.models.loading import ModelSpec, build_model, load_tokenizer

# The score head's state dict, next to the backbone's HF files.
SCORE_HEAD_FILE = "score_head.pt"


def load_reward_model(path: str) -> tuple[nn.Module, ScalarHead, PreTrainedTokenizerBase]:
    """(backbone, score head, tokenizer) saved by ``RewardModule.save_pretrained``, in eval mode."""
    head_file = Path(path) / SCORE_HEAD_FILE
    if not head_file.is_file():
        raise FileNotFoundError(f"'{path}' is no saved reward model: it has no {SCORE_HEAD_FILE} "
                                "(written by RewardModule.save_pretrained)")
    tokenizer = load_tokenizer(path)
    backbone = build_model(ModelSpec(name_or_path=path), tokenizer).eval()
    head = ScalarHead(backbone.config.hidden_size)
    head.load_state_dict(torch.load(head_file, weights_only=True))
    return backbone, head.eval(), tokenizer
