import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import greedy_reference
from lit_distill.rollout import Rollout, generate, left_pad, position_ids_from_mask, sequence_logprobs

VOCAB = 64
PAD = 0
PROMPTS = [[5, 17, 33], [9, 2, 44, 61, 7, 12, 30], [21, 8, 50, 3, 19]]


def build(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=128))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128))
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return build(request.param)


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def batch():
    return left_pad(PROMPTS, PAD)


def sample(model, batch, **kwargs):
    kwargs = {"max_new_tokens": 8, "eos_token_id": 1, "pad_token_id": PAD, **kwargs}
    return generate(model, *batch, **kwargs)


def test_left_pad_and_positions():
    input_ids, attention_mask = left_pad([[4, 5], [6, 7, 8]], pad_token_id=PAD)
    assert input_ids.tolist() == [[PAD, 4, 5], [6, 7, 8]]
    assert attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert position_ids_from_mask(attention_mask).tolist() == [[0, 0, 1], [0, 1, 2]]
    with pytest.raises(ValueError, match="token_ids"):
        left_pad([[4], []], pad_token_id=PAD)


@pytest.mark.parametrize("forced_eos", [False, True])
def test_greedy_matches_hf_generate(model, batch, forced_eos):
    steps = 10
    # Forced: EOS is a token that greedy decoding of the first prompt emits at step 3, so that row must stop.
    eos = int(greedy_reference(model, *batch, steps)[0, 2]) if forced_eos else 11
    ours = sample(model, batch, max_new_tokens=steps, eos_token_id=eos, do_sample=False)
    hf = model.generate(input_ids=batch[0], attention_mask=batch[1], max_new_tokens=steps, do_sample=False,
                        eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(ours.sequences, hf)
    if forced_eos:
        assert not ours.truncated[0] and ours.completion_lengths[0] <= 3


def test_padding_invariance(model, batch):
    alone = generate(model, *left_pad([PROMPTS[0]], PAD), max_new_tokens=8, eos_token_id=1, pad_token_id=PAD,
                     do_sample=False)
    together = sample(model, batch, do_sample=False)
    length = int(alone.completion_lengths[0])
    assert torch.equal(alone.completions[0, :length], together.completions[0, :length])


def test_one_prompt_forward_then_one_token_per_step(llama, batch):
    lengths = []
    handle = llama.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(kwargs["input_ids"].size(1)),
                                             with_kwargs=True)
    try:
        rollout = sample(llama, batch, max_new_tokens=6, eos_token_id=[])
    finally:
        handle.remove()
    # The last sampled token is never fed back.
    assert lengths == [batch[0].size(1)] + [1] * 5 and rollout.completions.size(1) == 6


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 0.9)])
def test_recorded_logprobs_match_fresh_forward(model, batch, temperature, top_k, top_p):
    generator = torch.Generator().manual_seed(0)
    rollout = sample(model, batch, max_new_tokens=12, eos_token_id=list(range(1, 9)), temperature=temperature,
                     top_k=top_k, top_p=top_p, generator=generator)
    assert (rollout.completion_mask == 0).any(), "a sequence should stop early so masking is exercised"
    fresh = sequence_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length,
                              temperature=temperature)
    assert rollout.logprobs.dtype == fresh.dtype == torch.float32
    torch.testing.assert_close(rollout.logprobs, fresh, atol=1e-5, rtol=0)
    masked = rollout.completion_mask == 0
    assert (rollout.logprobs[masked] == 0).all() and (rollout.logprobs[~masked] < 0).all()


def test_sampled_tokens_respect_top_k(llama, batch):
    rollout = sample(llama, batch, max_new_tokens=12, top_k=3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = llama(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                       position_ids=position_ids_from_mask(rollout.attention_mask)).logits
    top3 = logits[:, rollout.prompt_length - 1:-1].topk(3, dim=-1).indices  # (B, N, 3)
    in_top3 = (top3 == rollout.completions.unsqueeze(-1)).any(-1)
    assert in_top3[rollout.completion_mask.bool()].all()


def test_sequence_logprobs_is_differentiable(llama, batch):
    rollout = sample(llama, batch)
    logprobs = sequence_logprobs(llama, rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    assert logprobs.shape == rollout.completion_mask.shape and logprobs.requires_grad


def test_pad_equal_to_eos_keeps_the_eos_in_the_mask(llama, batch):
    reference = greedy_reference(llama, *batch, 8)
    eos = int(reference[0, 1])
    first = int((reference[0] == eos).nonzero()[0])  # first occurrence in row 0 (step 0 or 1)
    rollout = sample(llama, batch, eos_token_id=eos, pad_token_id=eos, do_sample=False)
    assert rollout.completions.size(1) > first + 1, "another row must outlive row 0 for the test to mean anything"
    assert rollout.completions[0, first] == eos
    assert rollout.completion_mask[0].tolist() == [1] * (first + 1) + [0] * (rollout.completions.size(1) - first - 1)
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_length:], rollout.completion_mask)
    assert (rollout.completions[0, first:] == eos).all() and rollout.completion_lengths[0] == first + 1


def test_truncation_lengths_and_early_stop(llama, batch):
    reference = greedy_reference(llama, *batch, 8)  # (B, 8)
    # EOS ids emitted by rows 0 and 2 early on; row 1 stops only if it also happens to emit one.
    eos = [int(reference[0, 1]), int(reference[2, 3])]
    rollout = sample(llama, batch, eos_token_id=eos, do_sample=False)
    is_eos = torch.isin(reference, torch.tensor(eos))
    finished = is_eos.any(-1)
    lengths = torch.where(finished, is_eos.int().argmax(-1) + 1, 8)
    assert torch.equal(rollout.truncated, ~finished) and rollout.truncated.dtype == torch.bool
    assert torch.equal(rollout.completion_lengths, lengths)
    assert rollout.completions.size(1) == int(lengths.max())
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(rollout.completions[row, :length], reference[row, :length])
        assert (rollout.completions[row, length:] == PAD).all()

    # Every row emits an EOS within its first 3 tokens: generation stops early and N is the longest completion.
    early = sample(llama, batch, eos_token_id=reference[:, 2].tolist(), do_sample=False)
    assert not early.truncated.any() and early.completions.size(1) == int(early.completion_lengths.max()) <= 3
    assert isinstance(early, Rollout) and early.sequences.size(1) == early.prompt_length + early.completions.size(1)


def test_generator_seed_controls_samples(llama, batch):
    def draw(seed):
        return sample(llama, batch, max_new_tokens=10, eos_token_id=[],
                      generator=torch.Generator().manual_seed(seed)).sequences

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize("filtering", [{"top_k": 1}, {"top_p": 1e-6}])
def test_degenerate_filtering_is_greedy(model, batch, filtering):
    greedy = sample(model, batch, do_sample=False)
    filtered = sample(model, batch, temperature=0.5, generator=torch.Generator().manual_seed(0), **filtering)
    assert torch.equal(filtered.sequences, greedy.sequences)


@pytest.mark.parametrize("training", [True, False])
def test_train_eval_mode_is_left_alone(batch, training):
    model = build("gpt2").train(training)
    sample(model, batch, max_new_tokens=3)
    assert all(module.training == training for module in model.modules())


@pytest.mark.parametrize("kwargs,name", [({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
                                         ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                         ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_arguments_raise(llama, batch, kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample(llama, batch, **kwargs)
