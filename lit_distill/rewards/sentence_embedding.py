"""Semantic similarity of a completion to a reference text under a sentence-embedding encoder.

Reads sentence-transformers model directories (e.g. all-MiniLM-L6-v2) with plain transformers: the encoder and
tokenizer with ``AutoModel`` / ``AutoTokenizer``, the pooling from ``1_Pooling/config.json``. No
sentence-transformers install is needed.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModel, AutoTokenizer
from transformers.utils import cached_file

from lit_distill.models.heads import last_token_index
from lit_distill.rewards.base import Reward, frozen

# sentence-transformers Pooling config flags this reward implements, in the order Pooling concatenates them.
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                 "pooling_mode_lasttoken": "last"}
# Module types of modules.json that leave the cosine unchanged or are handled here.
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


def _optional_file(path: str, filename: str, subfolder: str = "") -> str | None:
    """Local path of ``filename`` in a model directory or (cached) hub repo, ``None`` where it has none."""
    return cached_file(path, filename, subfolder=subfolder, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def read_layout(path: str) -> tuple[str, list[str]]:
    """Where the encoder lives and how to pool, from a sentence-transformers ``modules.json``.

    Args:
        path: model directory or hub id.

    Returns:
        ``(encoder_subfolder, pooling_modes)``; a plain encoder (no ``modules.json``) gives ``("", ["mean"])``,
        sentence-transformers' own default.

    Raises:
        ValueError: a module (e.g. ``Dense``) or pooling mode (e.g. ``weightedmean``) this reward does not
            implement, which would change the embeddings.
    """
    modules_file = _optional_file(path, "modules.json")
    if modules_file is None:
        return "", ["mean"]
    with open(modules_file) as file:
        modules = json.load(file)
    encoder, modes = "", ["mean"]
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind not in SUPPORTED_MODULES:
            raise ValueError(f"SentenceEmbeddingCosine: module '{module['type']}' of '{path}/modules.json' is not "
                             f"supported (only {SUPPORTED_MODULES})")
        if kind == "Transformer":
            encoder = module["path"]
        elif kind == "Pooling":
            config_file = _optional_file(path, "config.json", subfolder=module["path"])
            if config_file is None:
                raise FileNotFoundError(f"'{path}' has no {module['path']}/config.json for its Pooling module")
            with open(config_file) as file:
                config = json.load(file)
            unknown = [key for key, on in config.items() if key.startswith("pooling_mode_") and on
                       and key not in POOLING_MODES]
            if unknown:
                raise ValueError(f"SentenceEmbeddingCosine: pooling {unknown} of '{path}' is not supported "
                                 f"(only {list(POOLING_MODES)})")
            modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    return encoder, modes


def pool(hidden_states: Tensor, attention_mask: Tensor, modes: list[str]) -> Tensor:
    """(B, T, H), (B, T) right-padded -> (B, k·H): the ``modes`` poolings over real tokens, concatenated."""
    mask = attention_mask[..., None].to(hidden_states.dtype)  # (B, T, 1)
    lengths = mask.sum(1).clamp(min=1)  # (B, 1)
    pooled = {
        "cls": lambda: hidden_states[:, 0],
        "max": lambda: hidden_states.masked_fill(mask == 0, torch.finfo(hidden_states.dtype).min).amax(1),
        "mean": lambda: (hidden_states * mask).sum(1) / lengths,
        "mean_sqrt_len": lambda: (hidden_states * mask).sum(1) / lengths.sqrt(),
        "last": lambda: hidden_states[torch.arange(hidden_states.size(0)), last_token_index(attention_mask)],
    }
    return torch.cat([pooled[mode]() for mode in modes], dim=-1)


class SentenceEmbeddingCosine(Reward):
    """Cosine similarity, in [−1, 1], of the sentence embeddings of the completion and of the reference.

    Works with sentence-transformers directories (encoder + ``modules.json`` + ``1_Pooling``; CLS, mean, max,
    mean-sqrt-len and last-token pooling) and with plain HF encoders (mean pooling over the attention mask).
    A ``Normalize`` module is honoured trivially: the cosine is the dot product of L2-normalised embeddings
    either way. Texts are cut to ``max_length`` tokens. An empty (or all-whitespace) completion scores 0.

    Args:
        path: local sentence-transformers or HF encoder directory, or hub id.
        reference_column: dataset column holding the reference text.
        max_length: longest tokenised text (all-MiniLM-L6-v2 was trained with 256).
        batch_size: texts encoded per forward pass.
    """

    def __init__(self, path: str, reference_column: str = "reference", max_length: int = 256, batch_size: int = 32):
        super().__init__()
        subfolder, self.pooling = read_layout(path)
        try:
            # Right padding: CLS pooling reads position 0.
            self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder=subfolder, padding_side="right")
            self.encoder = frozen(AutoModel.from_pretrained(path, subfolder=subfolder))
        except OSError as err:
            raise OSError(f"could not load a sentence encoder from '{path}' (local directory or hub id): "
                          f"{err}") from err
        self.reference_column = reference_column
        self.max_length = max_length
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> Tensor:
        """(B,) texts -> (B, D) fp32 L2-normalised sentence embeddings."""
        embeddings = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.encoder(**inputs).last_hidden_state  # (b, T, H)
            embeddings.append(pool(hidden, inputs["attention_mask"], self.pooling).float())
        return F.normalize(torch.cat(embeddings), dim=-1)

    @torch.no_grad()
    def forward(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        references = list(self.column(columns, self.reference_column))
        similarity = (self.embed(completions) * self.embed(references)).sum(-1)  # (B,)
        empty = torch.tensor([not completion.strip() for completion in completions], device=similarity.device)
        return similarity.masked_fill(empty, 0.0).tolist()
