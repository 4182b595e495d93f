"""The built-in pico architectures (pico_transformer, pico_lstm, pico_kgram) behave like HF causal LMs."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import greedy_reference
from lit_distill.models.loading import LoRASpec, ModelSpec, apply_lora, build_model, keep_decoder_layers
from lit_distill.models.pico import (PicoKGramCache, PicoKGramConfig, PicoKGramForCausalLM, PicoLSTMForCausalLM, PicoLSTMState,
                                     PicoTransformerConfig, PicoTransformerForCausalLM)
from lit_distill.models.forward import causal_lm_logits
from lit_distill.rollout import generate, left_pad, position_ids_from_mask, sequence_logprobs

# initializer_range above the 0.02 default so that random models have peaked, prompt-dependent logits: with
# near-uniform logits greedy decoding would repeat one token and the equality tests would prove little.
CONFIGS = {
    "transformer": {"model_type": "pico_transformer", "hidden_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "initializer_range": 0.1},
    "transformer_learned_gelu_gqa": {"model_type": "pico_transformer", "hidden_size": 32, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "position_embedding": "learned", "max_position_embeddings": 64, "mlp": "gelu",
                                     "tie_word_embeddings": False, "initializer_range": 0.1},
    "lstm": {"model_type": "pico_lstm", "hidden_size": 32, "num_hidden_layers": 2, "initializer_range": 0.3},
    "kgram": {"model_type": "pico_kgram", "context_size": 3, "embedding_size": 16, "hidden_size": 32,
              "num_hidden_layers": 1, "initializer_range": 0.2},
}
CLASSES = {"pico_transformer": PicoTransformerForCausalLM, "pico_lstm": PicoLSTMForCausalLM,
           "pico_kgram": PicoKGramForCausalLM}
LORA_TARGETS = {"pico_transformer": ["q_proj", "v_proj", "up_proj"], "pico_lstm": ["lm_head"],
                "pico_kgram": ["in_proj", "fc"]}
TEXTS = ["Mara lives in Ashford.", "Tomas has a brown dog called Biscuit and he loves fish soup.",
         "Seven plus five is twelve.", "Her best friend is Leo."]
NO_EOS = []  # generate(eos_token_id=[]) never stops early


# These models are tiny: on a busy 2-core machine, intra-op threads cost far more than the matmuls.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(name, tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(ModelSpec(config={**CONFIGS[name], **overrides}), tokenizer).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def name(request):
    return request.param


@pytest.fixture(scope="module")
def model(name, tokenizer):
    return build(name, tokenizer)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return left_pad([tokenizer.encode(text) for text in TEXTS], tokenizer.pad_token_id)


def greedy(model, input_ids, attention_mask, steps, eos=NO_EOS, pad=1):
    return generate(model, input_ids, attention_mask, max_new_tokens=steps, eos_token_id=eos, pad_token_id=pad,
                    do_sample=False)


def test_build_from_config_logits_and_loss(model, name, tokenizer, batch):
    config = model.config
    assert type(model) is CLASSES[CONFIGS[name]["model_type"]]
    assert config.vocab_size == len(tokenizer) and config.pad_token_id == tokenizer.pad_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.num_hidden_layers == CONFIGS[name]["num_hidden_layers"]
    input_ids, attention_mask = batch
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                labels=labels)
    assert out.logits.shape == (*input_ids.shape, len(tokenizer))
    assert torch.isfinite(out.logits).all()
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, len(tokenizer)), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # logits_to_keep computes only the last positions, with the same values.
    last = model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), logits_to_keep=2).logits
    torch.testing.assert_close(last, out.logits[:, -2:])


def test_save_pretrained_round_trip(model, tokenizer, batch, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert {**reloaded.config.to_dict(), "_name_or_path": ""} == {**model.config.to_dict(), "_name_or_path": ""}
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert state.keys() == reloaded_state.keys() and all(torch.equal(state[k], reloaded_state[k]) for k in state)
    # Same weights; only BLAS kernels that depend on memory alignment may round differently (~1e-9).
    torch.testing.assert_close(causal_lm_logits(reloaded, *batch), causal_lm_logits(model, *batch),
                               atol=1e-6, rtol=0)
    if getattr(model.config, "tie_word_embeddings", False):
        assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight


@pytest.mark.parametrize("steps", [12])
def test_cached_greedy_equals_no_cache_reference(model, batch, steps):
    reference = greedy_reference(model, *batch, steps)
    ours = greedy(model, *batch, steps)
    assert torch.equal(ours.completions, reference)
    assert len(set(reference.flatten().tolist())) > 4  # a non-degenerate model: different tokens get picked


def test_rows_that_stop_early_do_not_disturb_the_others(model, batch, tokenizer):
    """A finished row keeps being fed (masked) pad tokens; the other rows must continue as if alone."""
    steps = 10
    reference = greedy_reference(model, *batch, steps)
    eos = int(reference[0, 2])  # row 0 emits this at step 3
    ours = greedy(model, *batch, steps, eos=eos, pad=tokenizer.pad_token_id)
    assert not ours.truncated[0] and ours.completion_lengths[0] <= 3
    for row in range(reference.size(0)):
        hits = (reference[row] == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else steps
        assert torch.equal(ours.completions[row, :n], reference[row, :n])
        assert ours.completion_mask[row].sum() == n
        assert (ours.completions[row, n:] == tokenizer.pad_token_id).all()


def test_padding_invariance(model, tokenizer, batch):
    together = greedy(model, *batch, 8)
    logits = causal_lm_logits(model, *batch)
    for row, text in enumerate(TEXTS):
        ids = torch.tensor([tokenizer.encode(text)])
        alone = greedy(model, ids, torch.ones_like(ids), 8)
        assert torch.equal(alone.completions[0], together.completions[row])
        real = batch[1][row].bool()
        torch.testing.assert_close(causal_lm_logits(model, ids, torch.ones_like(ids))[0], logits[row, real],
                                   atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_equal_rollout_logprobs(model, batch, tokenizer):
    generator = torch.Generator().manual_seed(0)
    rollout = generate(model, *batch, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, temperature=0.8, generator=generator)
    with torch.no_grad():
        scored = sequence_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length,
                                   temperature=0.8)
    torch.testing.assert_close(scored, rollout.logprobs, atol=1e-5, rtol=1e-5)


def test_a_few_sgd_steps_learn_a_repetitive_text(name, tokenizer):
    model = build(name, tokenizer, seed=1).train()
    ids = torch.tensor([tokenizer.encode("Mara lives in Ashford. " * 6)] * 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_lora_trains_only_the_adapter(name, tokenizer, batch):
    # The LSTM's only Linear is its head; untie it so that the adapter does not sit on the shared embedding.
    base = build(name, tokenizer, seed=2, **({"tie_word_embeddings": False} if name == "lstm" else {}))
    model = apply_lora(base, LoRASpec(r=4, alpha=8, target_modules=LORA_TARGETS[base.config.model_type]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    input_ids, attention_mask = batch
    model.train()
    loss = model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask),
                 labels=input_ids.masked_fill(attention_mask == 0, -100)).loss
    loss.backward()
    optimizer.step()
    model.eval()
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # The wrapped model still runs through the engine with its cache, and matches the cache-free reference.
    assert torch.equal(greedy(model, *batch, 6).completions, greedy_reference(model, *batch, 6))


def test_kgram_logits_depend_only_on_the_last_k_tokens(tokenizer):
    model = build("kgram", tokenizer)
    k = model.config.context_size
    ids = torch.tensor([tokenizer.encode(TEXTS[1])])
    t = ids.size(1) - 1
    changed_early = ids.clone()
    changed_early[0, : t - k + 1] = torch.randint(2, len(tokenizer), (t - k + 1,))
    with torch.no_grad():
        logits, logits_early = model(input_ids=ids).logits, model(input_ids=changed_early).logits
        assert torch.equal(logits[0, t], logits_early[0, t])
        changed_inside = ids.clone()
        changed_inside[0, t - k + 1] = (ids[0, t - k + 1] + 1) % len(tokenizer)  # oldest token of the window
        assert not torch.allclose(model(input_ids=changed_inside).logits[0, t], logits[0, t])


def test_kgram_cache_holds_the_last_real_tokens(tokenizer):
    model = build("kgram", tokenizer)
    input_ids, attention_mask = left_pad([[5, 6, 7, 8], [9]], tokenizer.pad_token_id)
    out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=DynamicCache(), use_cache=True)
    assert isinstance(out.past_key_values, PicoKGramCache)
    assert out.past_key_values.tokens.tolist() == [[7, 8], [-1, 9]]  # context_size 3: the last 2, -1 = empty
    step = model(input_ids=torch.tensor([[10], [11]]), attention_mask=F.pad(attention_mask, (0, 1), value=0),
                 past_key_values=out.past_key_values, use_cache=True)
    assert step.past_key_values.tokens.tolist() == [[7, 8], [-1, 9]]  # masked tokens do not enter the context


def test_transformer_is_causal(tokenizer):
    model = build("transformer", tokenizer)
    ids = torch.tensor([tokenizer.encode(TEXTS[1])])
    t = 5
    changed_late = ids.clone()
    changed_late[0, t + 1:] = torch.randint(2, len(tokenizer), (ids.size(1) - t - 1,))
    changed_early = ids.clone()
    changed_early[0, 0] = (ids[0, 0] + 1) % len(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=changed_late).logits[0, : t + 1], logits[0, : t + 1])
        assert not torch.allclose(model(input_ids=changed_early).logits[0, t], logits[0, t])


@pytest.mark.parametrize("name", ["transformer", "transformer_learned_gelu_gqa"])
def test_transformer_uses_position_ids(name, tokenizer):
    model = build(name, tokenizer)
    ids = torch.tensor([tokenizer.encode(TEXTS[1])])
    positions = torch.arange(ids.size(1))[None]
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions).logits
        assert not torch.allclose(model(input_ids=ids, position_ids=2 * positions).logits, logits)
        shifted = model(input_ids=ids, position_ids=positions + 7).logits
    if model.config.position_embedding == "rope":  # rotary attention sees only relative positions
        torch.testing.assert_close(shifted, logits, atol=1e-5, rtol=1e-4)
    else:
        assert not torch.allclose(shifted, logits)


def test_lstm_state_is_the_cache(tokenizer):
    model = build("lstm", tokenizer)
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :3], past_key_values=DynamicCache(), use_cache=True)
        rest = model(input_ids=ids[:, 3:], past_key_values=first.past_key_values, use_cache=True)
    assert isinstance(first.past_key_values, PicoLSTMState)
    assert first.past_key_values.h.shape == (model.config.num_hidden_layers, 1, model.config.hidden_size)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-6, rtol=1e-5)
    # A masked token (a finished row in a batch) leaves the state exactly as it was.
    state = first.past_key_values
    with torch.no_grad():
        masked = model(input_ids=ids[:, 3:4], attention_mask=torch.tensor([[1, 1, 1, 0]]), past_key_values=state,
                       use_cache=True).past_key_values
    assert torch.equal(masked.h, state.h) and torch.equal(masked.c, state.c)


def test_hf_generate_agrees_with_our_engine(model, tokenizer, batch):
    ours = greedy(model, *batch, 8, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    hf = model.generate(input_ids=batch[0], attention_mask=batch[1], max_new_tokens=8, do_sample=False,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(ours.sequences, hf[:, : ours.sequences.size(1)])


def test_transformer_keep_layers_and_gradient_checkpointing(tokenizer, batch):
    model = build("transformer", tokenizer, num_hidden_layers=3)
    keep_decoder_layers(model, [0, 2])
    assert model.config.num_hidden_layers == 2 and [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]
    assert torch.equal(greedy(model, *batch, 6).completions, greedy_reference(model, *batch, 6))

    def grads(checkpointing):
        torch.manual_seed(3)
        m = build("transformer", tokenizer).train()
        if checkpointing:
            m.gradient_checkpointing_enable()
        causal_lm_logits(m, *batch).logsumexp(-1).sum().backward()
        return [p.grad for p in m.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


def test_config_validation():
    # @strict configs report validator errors as huggingface_hub StrictDataclassClassValidationError.
    with pytest.raises(Exception, match="not a multiple of num_attention_heads"):
        PicoTransformerConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(Exception, match="position_embedding must be"):
        PicoTransformerConfig(position_embedding="alibi")
    with pytest.raises(Exception, match="context_size must be"):
        PicoKGramConfig(context_size=0)
    assert PicoTransformerConfig(hidden_size=64).intermediate_size == 176
    assert PicoTransformerConfig(hidden_size=64, mlp="gelu").intermediate_size == 256
