import random

import pytest
import torch
from conftest import greedy_reference, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lit_distill.models.pico import (
    PicoKGramConfig,
    PicoKGramForCausalLM,
    PicoLSTMConfig,
    PicoLSTMForCausalLM,
    PicoTransformerConfig,
    PicoTransformerForCausalLM,
)
from lit_distill.rollout import (
    FinishReason,
    Rollout,
    generate,
    left_pad,
    position_ids_from_mask,
    rollout_generator,
    sampling,
    sequence_logprobs,
)
from lit_distill.rollout.stopping import StopStringMatcher

VOCAB = 64
PAD = 0
PROMPTS = [[5, 17, 33], [9, 2, 44, 61, 7, 12, 30], [21, 8, 50, 3, 19]]


# These models are tiny: on a busy 2-core machine, intra-op threads cost far more than the matmuls.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=128))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128))
    elif kind == "pico_transformer":
        model = PicoTransformerForCausalLM(PicoTransformerConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4))
    elif kind == "pico_lstm":
        model = PicoLSTMForCausalLM(PicoLSTMConfig(vocab_size=VOCAB, hidden_size=32, initializer_range=0.3))
    else:
        model = PicoKGramForCausalLM(PicoKGramConfig(vocab_size=VOCAB, context_size=3, hidden_size=32,
                                                     initializer_range=0.3))
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


@pytest.mark.parametrize("kind", ["llama", "gpt2", "pico_transformer", "pico_lstm", "pico_kgram"])
def test_finished_rows_leave_the_batch(kind):
    model = build(kind)
    prompts = left_pad(PROMPTS + [[4, 40], [13, 27, 6, 58], [60, 2, 9, 9]], PAD)  # B = 6
    reference = greedy_reference(model, *prompts, 10)  # (B, 10)
    # EOS: early tokens of rows 0-3 that rows 4-5 do not emit soon, so that some rows end early and others do not.
    late = set(reference[4:, :6].flatten().tolist())
    eos = [token for token in reference[:4, :2].flatten().tolist() if token not in late]
    batch_sizes = []
    handle = model.register_forward_pre_hook(lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].size(0)),
                                             with_kwargs=True)
    try:
        rollout = generate(model, *prompts, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD, do_sample=False)
    finally:
        handle.remove()
    is_eos = torch.isin(reference, torch.tensor(eos))
    lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, 10)
    assert (lengths <= 2).sum() >= 3 and lengths.max() > 3, "half the rows must end well before the others"
    assert batch_sizes[0] == 6 and min(batch_sizes) <= 3
    assert torch.equal(rollout.completion_lengths, lengths)
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(rollout.completions[row, :length], reference[row, :length])
        assert (rollout.completions[row, length:] == PAD).all()
    fresh = sequence_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    torch.testing.assert_close(rollout.logprobs, fresh, atol=1e-5, rtol=0)


def test_sparse_finished_checks_cut_the_extra_steps(llama, batch, monkeypatch):
    """On accelerators the finished count is read every few steps; the steps run past the end must not show."""
    reference = greedy_reference(llama, *batch, 8)
    eos = reference[:, 1].tolist()  # every row ends within 2 tokens
    every_step = sample(llama, batch, eos_token_id=eos, do_sample=False)
    calls = []
    handle = llama.register_forward_pre_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(sampling, "_finished_check_every", lambda device: 4)
    try:
        sparse = sample(llama, batch, eos_token_id=eos, do_sample=False)
    finally:
        handle.remove()
    assert len(calls) == 4 > every_step.completions.size(1)  # prompt + 3 steps, read at step 4
    for field in ("sequences", "attention_mask", "completion_mask", "logprobs", "finish_reason"):
        assert torch.equal(getattr(sparse, field), getattr(every_step, field)), field


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.7)])
def test_sampling_frequencies_match_the_filtered_distribution(top_k, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, rows = 0.8, 200_000
    probs = (logits / temperature).softmax(-1)
    # Independent filter: the top-k tokens, then the smallest prefix (by probability) reaching top_p.
    keep = torch.zeros(6, dtype=torch.bool)
    mass = 0.0
    for rank, token in enumerate(probs.argsort(descending=True).tolist()):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[token], mass = True, mass + float(probs[token])
    expected = torch.where(keep, probs, 0.0) / probs[keep].sum()
    tokens, logprobs = sampling._sample(logits.expand(rows, -1), temperature, top_k, top_p, True,
                                        torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=6) / rows
    torch.testing.assert_close(frequencies, expected, atol=5e-3, rtol=0)  # > 4 standard deviations
    assert (frequencies[~keep] == 0).all()
    torch.testing.assert_close(logprobs, probs.log()[tokens])  # unfiltered, tempered


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


def test_rollout_generator_differs_per_rank_and_step(llama, batch):
    def draw(seed, rank, step):
        return sample(llama, batch, max_new_tokens=10, eos_token_id=[],
                      generator=rollout_generator(seed, rank, step)).sequences

    base = draw(0, 0, 0)
    assert torch.equal(base, draw(0, 0, 0))
    others = [draw(0, 1, 0), draw(0, 0, 1), draw(1, 0, 0)]
    assert all(not torch.equal(base, other) for other in others)
    assert not torch.equal(others[0], others[1])  # (rank 1, step 0) is not (rank 0, step 1)
    with pytest.raises(ValueError, match="rank"):
        rollout_generator(0, -1, 0)


@pytest.mark.parametrize("wrap", ["plain", "peft"])
def test_gradient_checkpointing_is_off_while_generating(batch, wrap):
    expected = sample(build("llama"), batch, generator=torch.Generator().manual_seed(0))
    model = build("llama")
    if wrap == "peft":  # LoRA's B starts at zero: the same function as the base model
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.get_base_model().activation_checkpointing_enable() if wrap == "peft" else model.activation_checkpointing_enable()
    model.train()  # HF layers drop the cache under checkpointing in training mode only (Llama has no dropout)
    calls = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((kwargs["input_ids"].size(1), kwargs.get("logits_to_keep"))),
        with_kwargs=True)
    try:
        rollout = sample(model, batch, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    # The cache is used (one token per step) and, under peft too, the prompt pass computes the last logits only.
    assert calls == [(batch[0].size(1), 1)] + [(1, None)] * (rollout.completions.size(1) - 1)
    assert torch.equal(rollout.sequences, expected.sequences)
    torch.testing.assert_close(rollout.logprobs, expected.logprobs)
    base = model.get_base_model() if wrap == "peft" else model
    assert base.is_activation_checkpointing and model.training  # restored


def first_stop(tokenizer, ids, stop_strings):
    """Naive reference: the fewest leading tokens whose decoded text contains a stop string (None: never)."""
    for n in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:n], skip_special_tokens=False) for s in stop_strings):
            return n
    return None


def test_stop_string_window_agrees_with_decoding_everything(tokenizer):
    stop_strings = ["é", " — ", "ll", "Paris.", "\n\n"]
    snippets = ["café au lait", "well — yes", "to Paris.", "a\n\nb", "hello", "naïve"]
    rng = random.Random(0)
    rows = []
    for _ in range(40):  # random tokens around a snippet that may hold a stop string (spanning tokens)
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(6))]
        ids += tokenizer.encode(rng.choice(snippets)) + [rng.randrange(len(tokenizer)) for _ in range(6)]
        rows.append(ids[:20] + [tokenizer.pad_token_id] * (20 - len(ids[:20])))
    completions = torch.tensor(rows)  # (B, 20)
    matcher = StopStringMatcher(stop_strings, tokenizer)
    alive = torch.ones(len(rows), dtype=torch.bool)
    found = [None] * len(rows)
    for length in range(1, 21):
        for row in matcher(completions, length, alive).nonzero().flatten().tolist():
            found[row] = length
        alive &= torch.tensor([f is None for f in found])
    assert found == [first_stop(tokenizer, ids, stop_strings) for ids in rows]
    assert sum(f is not None for f in found) > 20 and any(f is None for f in found)


def stop_model(tokenizer):
    return tiny_llama(len(tokenizer), seed=4).eval()


@pytest.fixture(scope="module")
def text_batch(tokenizer):
    prompts = ["Mara lives in", "The cat", "Seven plus five is twelve, and", "Her best friend"]
    return left_pad([tokenizer.encode(text) for text in prompts], tokenizer.pad_token_id)


def test_stop_strings_end_rows_where_the_text_first_contains_one(tokenizer, text_batch):
    model = stop_model(tokenizer)
    kwargs = {"max_new_tokens": 16, "eos_token_id": [], "pad_token_id": tokenizer.pad_token_id, "do_sample": False}
    free = generate(model, *text_batch, **kwargs)
    # A stop string from the middle of row 0's text, most likely spanning a token boundary.
    text = tokenizer.decode(free.completions[0, 4:7])
    stop_strings = [text[1:-1] if len(text) > 2 else text]
    rollout = generate(model, *text_batch, stop_strings=stop_strings, tokenizer=tokenizer, **kwargs)
    expected = [first_stop(tokenizer, ids.tolist(), stop_strings) for ids in free.completions]
    assert expected[0] is not None and None in expected, "some rows must stop and some not"
    lengths = torch.tensor([n or 16 for n in expected])
    assert torch.equal(rollout.completion_lengths, lengths)
    assert rollout.finish_reason.tolist() == [FinishReason.STOP if n else FinishReason.LENGTH for n in expected]
    assert torch.equal(rollout.stopped, torch.tensor([n is not None for n in expected]))
    assert torch.equal(rollout.truncated, ~rollout.stopped)
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(rollout.completions[row, :length], free.completions[row, :length])
        assert (rollout.completions[row, length:] == tokenizer.pad_token_id).all()
        assert (rollout.logprobs[row, length:] == 0).all()
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_length:], rollout.completion_mask)


def test_stop_strings_with_sampling_filters_keep_logprobs_exact(tokenizer, text_batch):
    model = stop_model(tokenizer)
    stop_strings = ["e ", "s."]
    eos = [tokenizer.eos_token_id, 7, 8]
    rollout = generate(model, *text_batch, max_new_tokens=24, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                       temperature=0.7, top_k=100, top_p=0.9, generator=torch.Generator().manual_seed(2),
                       stop_strings=stop_strings, tokenizer=tokenizer)
    fresh = sequence_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length,
                              temperature=0.7)
    torch.testing.assert_close(rollout.logprobs, fresh, atol=1e-5, rtol=0)
    reasons = rollout.finish_reason.tolist()
    assert FinishReason.STOP in reasons and set(reasons) != {FinishReason.STOP}
    for row, reason in enumerate(reasons):
        ids = rollout.completions[row, :int(rollout.completion_lengths[row])].tolist()
        stop_at = first_stop(tokenizer, ids, stop_strings)
        if reason == FinishReason.STOP:
            assert stop_at == len(ids) and ids[-1] not in eos
        elif reason == FinishReason.EOS:
            assert ids[-1] in eos and stop_at in (None, len(ids))  # EOS wins when one token does both
        else:
            assert stop_at is None and len(ids) == 24


def test_stop_strings_need_a_tokenizer_and_text(llama, batch, tokenizer):
    with pytest.raises(ValueError, match="tokenizer"):
        sample(llama, batch, stop_strings=["x"])
    with pytest.raises(ValueError, match="non-empty"):
        sample(llama, batch, stop_strings=[""], tokenizer=tokenizer)
