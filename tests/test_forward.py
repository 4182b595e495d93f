"""labelled_logits: the LM head on labelled positions only gives the full forward's logits, log-probs and gradients
there, for HF, pico, LoRA-wrapped and logit-post-processing models."""

import pytest
import torch
from torch.testing import assert_close
from transformers import Gemma2Config, Gemma2ForCausalLM

from conftest import tiny_llama
from lit_distill.losses import sequence_logprobs_from_logits
from lit_distill.models.forward import (causal_lm_logits, head_output_is_logits, labelled_logits,
                                        labelled_sequence_logprobs)
from lit_distill.models.loading import LoRASpec, ModelSpec, build_model

V = 37


def pico_transformer():
    torch.manual_seed(0)
    return build_model(ModelSpec(config={"model_type": "pico_transformer", "hidden_size": 32, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "vocab_size": V}))


def lora_llama():
    torch.manual_seed(0)
    return build_model(ModelSpec(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                         "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": V},
                                 lora=LoRASpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])))


def softcapped_gemma2():
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          final_logit_softcapping=0.05))  # binds: logits of ~0.1


MODELS = {"llama": lambda: tiny_llama(V), "pico_transformer": pico_transformer, "lora_llama": lora_llama,
          "softcapped_gemma2": softcapped_gemma2}


def batch():
    """Left- and right-padded rows with labels on a suffix only (prompt and padding -100), one row unlabelled."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, V, (4, 9), generator=generator)
    attention_mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6, [1] * 7 + [0, 0], [1] * 9])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    labels[3] = -100
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("name", MODELS)
def test_labelled_logits_and_logprobs_match_the_full_forward_with_gradients(name):
    input_ids, attention_mask, labels = batch()
    model = MODELS[name]().float()
    full = causal_lm_logits(model, input_ids, attention_mask)  # (B, T, V)
    expected_logps, expected_counts = sequence_logprobs_from_logits(full, labels)
    expected_grads = torch.autograd.grad(expected_logps.sum(), [p for p in model.parameters() if p.requires_grad])

    scored = labelled_logits(model, input_ids, attention_mask, labels)
    mask = labels[:, 1:] != -100
    assert scored.logits.shape == (int(mask.sum()), V)
    assert_close(scored.logits, full[:, :-1][mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(scored.targets, labels[:, 1:][mask])
    logps, counts = labelled_sequence_logprobs(model, input_ids, attention_mask, labels)
    assert_close(logps, expected_logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, expected_counts) and logps[3] == 0 and counts[3] == 0
    grads = torch.autograd.grad(logps.sum(), [p for p in model.parameters() if p.requires_grad])
    for grad, expected in zip(grads, expected_grads):
        assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_a_model_that_post_processes_its_head_output_is_run_whole():
    model = softcapped_gemma2()
    input_ids, attention_mask, _ = batch()
    assert not head_output_is_logits(model) and head_output_is_logits(tiny_llama(V))
    # The premise: the head alone would give other values than the model's soft-capped logits.
    from lit_distill.models.heads import final_hidden_states
    head_only = model.get_output_embeddings()(final_hidden_states(model, input_ids, attention_mask))
    assert (head_only - causal_lm_logits(model, input_ids, attention_mask)).abs().max() > 0.05
