"""Token and sequence log-probs against float64 log_softmax and naive python loops."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lit_distill.losses import logprobs as logprobs_module
from lit_distill.losses import sequence_logprobs_from_logits, token_logprobs

B, T, V = 3, 6, 11


def reference_token_logprobs(logits, tokens, temperature=1.0):
    """log_softmax + gather in float64."""
    return F.log_softmax(logits.double() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)


def naive_sequence_logprobs(logits, labels, ignore_index=-100):
    """Python loop: logits[b, t - 1] predicts labels[b, t]; returns lists of sums and counts."""
    sums, counts = [], []
    for b in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(1, labels.shape[1]):
            label = int(labels[b, t])
            if label == ignore_index:
                continue
            row = logits[b, t - 1].double().tolist()
            top = max(row)
            total += row[label] - top - math.log(sum(math.exp(x - top) for x in row))
            count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(B, T, V, generator=generator)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    return logits, tokens


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_log_softmax(inputs, temperature):
    logits, tokens = inputs
    out = token_logprobs(logits, tokens, temperature)
    assert out.shape == (B, T) and out.dtype == torch.float32
    assert_close(out.double(), reference_token_logprobs(logits, tokens, temperature), rtol=0, atol=2e-6)
    # float64 stays float64 and is exact up to rounding.
    out64 = token_logprobs(logits.double(), tokens, temperature)
    assert out64.dtype == torch.float64
    assert_close(out64, reference_token_logprobs(logits, tokens, temperature), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_bf16_is_computed_in_fp32(inputs, temperature):
    logits, tokens = inputs
    half = logits.bfloat16()
    out = token_logprobs(half, tokens, temperature)
    assert out.dtype == torch.float32
    # Exact up to fp32 rounding on the bf16 values themselves, and close to the fp32 logits' log-probs.
    assert_close(out.double(), reference_token_logprobs(half, tokens, temperature), rtol=0, atol=2e-6)
    assert_close(out.double(), reference_token_logprobs(logits, tokens, temperature), rtol=0, atol=0.05)


def test_token_logprobs_any_leading_shape_and_non_contiguous(inputs):
    logits, tokens = inputs
    assert_close(token_logprobs(logits[0, 0], tokens[0, 0]), token_logprobs(logits, tokens)[0, 0])  # (V,), ()
    sliced = logits[:, :-1]  # non-contiguous (B, T - 1, V)
    assert_close(token_logprobs(sliced, tokens[:, :-1]), token_logprobs(logits, tokens)[:, :-1], rtol=0, atol=0)


def test_token_logprobs_chunked_matches_unchunked(inputs, monkeypatch):
    logits, tokens = inputs
    logits.requires_grad_(True)
    full = token_logprobs(logits, tokens, 0.7)
    (full_grad,) = torch.autograd.grad(full.sum(), logits)
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 4 * V)  # 4 rows per chunk: 18 rows -> 5 chunks
    chunked = token_logprobs(logits, tokens, 0.7)
    (chunked_grad,) = torch.autograd.grad(chunked.sum(), logits)
    assert_close(chunked, full, rtol=0, atol=0)
    assert_close(chunked_grad, full_grad, rtol=0, atol=0)


def test_token_logprobs_gradient(inputs):
    logits, tokens = inputs
    logits = logits[:2, :3].double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens[:2, :3], 0.7), (logits,))
    # d log p(y) / d logits = (onehot(y) − p) / T.
    out = token_logprobs(logits, tokens[:2, :3], 0.7)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    expected = (F.one_hot(tokens[:2, :3], V) - (logits.detach() / 0.7).softmax(-1)) / 0.7
    assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_token_logprobs_bad_arguments(inputs):
    logits, tokens = inputs
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, tokens, 0.0)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(logits, tokens[:, 1:])


def masked_labels(tokens):
    labels = tokens.clone()
    labels[0, :3] = -100  # prompt
    labels[1, 4:] = -100  # padding
    labels[2, 1:] = -100  # fully masked (labels[:, 0] is never scored)
    return labels


def test_sequence_logprobs_match_naive_loop(inputs):
    logits, tokens = inputs
    labels = masked_labels(tokens)
    sums, counts = sequence_logprobs_from_logits(logits, labels)
    expected_sums, expected_counts = naive_sequence_logprobs(logits, labels)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert counts.tolist() == expected_counts == [3, 3, 0]
    assert_close(sums.double(), torch.tensor(expected_sums, dtype=torch.float64), rtol=0, atol=1e-5)
    assert sums[2] == 0
    # Unmasked everywhere: the sum over T - 1 shifted positions.
    sums, counts = sequence_logprobs_from_logits(logits, tokens)
    assert counts.tolist() == [T - 1] * B
    assert_close(sums, token_logprobs(logits[:, :-1], tokens[:, 1:]).sum(-1))


def test_sequence_logprobs_custom_ignore_index_and_bf16(inputs):
    logits, tokens = inputs
    labels = masked_labels(tokens).masked_fill(masked_labels(tokens) == -100, -1)
    sums, counts = sequence_logprobs_from_logits(logits.bfloat16(), labels, ignore_index=-1)
    expected_sums, expected_counts = naive_sequence_logprobs(logits.bfloat16(), labels, ignore_index=-1)
    assert sums.dtype == torch.float32 and counts.tolist() == expected_counts
    assert_close(sums.double(), torch.tensor(expected_sums, dtype=torch.float64), rtol=0, atol=1e-5)


def test_sequence_logprobs_masked_positions_no_nan_and_gradient(inputs):
    logits, tokens = inputs
    labels = masked_labels(tokens)
    logits = logits.requires_grad_(True)
    sums, _ = sequence_logprobs_from_logits(logits, labels)
    sums.sum().backward()
    assert torch.isfinite(sums).all() and torch.isfinite(logits.grad).all()
    # Only positions predicting an unmasked next label receive gradient; each such row's gradient sums to 0.
    scored = F.pad(labels[:, 1:] != -100, (0, 1))  # (B, T)
    assert (logits.grad[~scored] == 0).all()
    assert (logits.grad[scored].abs().sum(-1) > 0).all()
    assert_close(logits.grad.sum(-1), torch.zeros(B, T), rtol=0, atol=1e-6)


def test_sequence_logprobs_gradcheck(inputs):
    logits, tokens = inputs
    logits = logits[:, :4].double().requires_grad_(True)
    labels = masked_labels(tokens)[:, :4]
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs_from_logits(x, labels)[0], (logits,))


def test_sequence_logprobs_bad_shapes(inputs):
    logits, tokens = inputs
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs_from_logits(logits, tokens[:, 1:])
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs_from_logits(logits[0], tokens[0])
