"""pico_transformer attention: SDPA with ``is_causal`` / no mask / a boolean mask equals a dense reference."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from lit_distill.models.pico import PicoTransformerConfig, PicoTransformerForCausalLM

VOCAB = 50
CONFIGS = {
    "rope": {},
    "learned_gqa": {"num_key_value_heads": 2, "position_embedding": "learned", "max_position_embeddings": 32},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dense_attention(attention_mask, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    """Stand-in for SDPA that ignores the mask arguments and builds the dense mask from the call's inputs: query i
    (absolute position past + i) attends to key j <= past + i whose ``attention_mask`` is 1, and to itself.

    Args:
        attention_mask: (B, T) or None (all 1).
        q: (B, h, S, d); k, v: (B, h, T, d).
    """
    length, total = q.size(-2), k.size(-2)
    past = total - length
    real = torch.ones(q.size(0), total, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    query, key = torch.arange(past, total)[:, None], torch.arange(total)[None, :]
    visible = (key <= query) & (real[:, None, :] | (key == query))  # (B, S, T)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1) @ v


def run(model, calls, reference=False):
    """Concatenated logits of consecutive calls ``(input_ids, attention_mask)``, sharing a cache when there are
    several; with ``reference``, attention is :func:`dense_attention` under each call's mask."""
    cache = DynamicCache() if len(calls) > 1 else None
    logits = []
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        for input_ids, attention_mask in calls:
            if reference:
                patch.setattr(F, "scaled_dot_product_attention", partial(dense_attention, attention_mask))
            out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                        use_cache=cache is not None)
            cache = out.past_key_values
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


def scenarios():
    """name -> the calls of one forward or one cached decode (prefill, one token, a 3-token chunk)."""
    ids = torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids)
    padded = ones.clone()
    padded[1, :4] = padded[2, :7] = 0
    return {
        "no_mask": [(ids, None)],
        "all_ones": [(ids, ones)],
        "left_padded": [(ids, padded)],
        "cache_no_mask": [(ids[:, :8], None), (ids[:, 8:9], None), (ids[:, 9:], None)],
        "cache_all_ones": [(ids[:, :8], ones[:, :8]), (ids[:, 8:9], ones[:, :9]), (ids[:, 9:], ones)],
        "cache_left_padded": [(ids[:, :8], padded[:, :8]), (ids[:, 8:9], padded[:, :9]), (ids[:, 9:], padded)],
    }


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("scenario", list(scenarios()))
def test_attention_equals_the_dense_reference(config, scenario):
    torch.manual_seed(0)
    model = PicoTransformerForCausalLM(PicoTransformerConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.1,
        **CONFIGS[config])).eval()
    calls = scenarios()[scenario]
    torch.testing.assert_close(run(model, calls), run(model, calls, reference=True), atol=1e-5, rtol=0)


def test_unpadded_calls_pass_no_mask_to_sdpa(monkeypatch):
    """No padding: the prefill is ``is_causal`` and a one-token step attends to everything, both without a mask
    (what lets SDPA pick its flash kernel); a chunk after a cache and padded calls pass a boolean mask."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        seen.append((None if attn_mask is None else attn_mask.dtype, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    model = PicoTransformerForCausalLM(PicoTransformerConfig(vocab_size=VOCAB, hidden_size=32,
                                                             num_hidden_layers=1)).eval()
    expected = {"no_mask": [(None, True)], "all_ones": [(None, True)], "left_padded": [(torch.bool, False)],
                "cache_all_ones": [(None, True), (None, False), (torch.bool, False)],
                "cache_left_padded": [(torch.bool, False)] * 3}
    for name, calls in scenarios().items():
        if name in expected:
            seen.clear()
            run(model, calls)
            assert seen == expected[name], name
