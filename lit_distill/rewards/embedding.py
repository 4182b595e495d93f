"""Similarity of a completion to a reference text in a causal LM's input-embedding space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_distill.data.collate import tokenize
from lit_distill.models.loading import ModelSpec, build_model, load_tokenizer
from lit_distill.rewards.base import Reward


class TokenEmbeddingCosine(Reward):
    """Cosine similarity, in [−1, 1], of the mean input-embedding vector of the completion's tokens and that of
    the reference's tokens.

    A cheap, order-blind "same words?" signal: only the model's embedding matrix and tokenizer are kept (the rest
    of the model is freed after loading). Text is tokenised without special tokens. An empty completion (or
    reference) has no tokens and scores 0.

    Args:
        model: the model whose input embeddings are used (any causal LM ``build_model`` can load).
        reference_column: dataset column holding the reference text.
    """

    def __init__(self, model: ModelSpec, reference_column: str = "reference"):
        super().__init__()
        self.tokenizer = load_tokenizer(model.tokenizer or model.name_or_path)
        weight = build_model(model, self.tokenizer).get_input_embeddings().weight.detach().clone()  # (V, H)
        # Mean of each text's token vectors in one call; an empty text gives the zero vector (cosine 0).
        self.embeddings = nn.EmbeddingBag.from_pretrained(weight, freeze=True, mode="mean")
        self.reference_column = reference_column

    def mean_embeddings(self, texts: list[str]) -> Tensor:
        """(B,) texts -> (B, H) fp32 mean token embedding of each."""
        ids = [tokenize(self.tokenizer, text) for text in texts]
        offsets = torch.tensor([0] + [len(row) for row in ids[:-1]]).cumsum(0)  # (B,) start of each text
        flat = torch.tensor([token for row in ids for token in row], dtype=torch.long)
        return self.embeddings(flat.to(self.device), offsets.to(self.device)).float()

    @torch.no_grad()
    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        references = self.column(columns, self.reference_column)
        return F.cosine_similarity(self.mean_embeddings(completions), self.mean_embeddings(list(references)),
                                   dim=-1).tolist()
