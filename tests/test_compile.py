"""ModelSpec.compile: a compiled decoder stack gives the eager model's loss and gradients, keep parameter names, are
compiled again in a reference copy, and run eagerly while sampling."""

import torch
from torch.testing import assert_close

from conftest import TOKENIZER
from lit_distill.models.forward import causal_lm_logits
from lit_distill.models.loading import ModelSpec, copy_model
from lit_distill.modules import SFTModule

CONFIG = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2}


def module(compile: bool) -> SFTModule:
    torch.manual_seed(0)
    return SFTModule(ModelSpec(config=CONFIG, tokenizer=TOKENIZER, compile=compile))


def loss_and_grads(model, input_ids, attention_mask):
    loss = causal_lm_logits(model, input_ids, attention_mask).logsumexp(-1).mean()
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def test_compiled_layers_match_eager_and_sampling_stays_eager():
    torch._dynamo.reset()
    eager, compiled = module(False), module(True)
    assert compiled.model.model._compiled_call_impl is not None and compiled.model.lm_head._compiled_call_impl is None
    assert [name for name, _ in compiled.named_parameters()] == [name for name, _ in eager.named_parameters()]
    for length in (5, 7):  # a second length: the dynamic-shape graph
        input_ids = torch.randint(3, 1000, (2, length), generator=torch.Generator().manual_seed(length))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0
        expected_loss, expected_grads = loss_and_grads(eager.model, input_ids, attention_mask)
        loss, grads = loss_and_grads(compiled.model, input_ids, attention_mask)
        assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
        for grad, expected in zip(grads, expected_grads):
            assert_close(grad, expected, atol=1e-5, rtol=1e-4)

    reference = copy_model(compiled.model, compiled.hparams.model)
    assert reference.model._compiled_call_impl is not None

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    rollout = compiled.complete(input_ids, attention_mask, max_new_tokens=3, do_sample=False)
    assert rollout.completions.shape == (2, 3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no graph for the KV-cache steps
