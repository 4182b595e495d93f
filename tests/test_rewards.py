"""Reward functions: reference values, naive-loop equivalence for the model-based ones, the weighted sum, YAML."""

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER
from jsonargparse import ArgumentParser
from transformers import AutoModelForCausalLM, BertConfig, BertModel, BertTokenizer

from lit_distill.data.corpus import arithmetic_problems, number_words
from lit_distill.models.loading import ModelSpec
from lit_distill.rewards import (
    ArithmeticReward,
    CallableReward,
    InverseLoss,
    MissingColumnError,
    ReferenceMatch,
    RepetitionPenalty,
    Reward,
    RewardModelScore,
    SentenceEmbeddingCosine,
    TokenEmbeddingCosine,
    WeightedRewards,
)

PROMPTS = ["Mara lives in Ashford.", "What is 7 plus 5?", "Ben is a baker. He"]
COMPLETIONS = [" She is a teacher.", " twelve", " likes bread and soup and bread"]


@pytest.fixture()
def reward_functions(tmp_path, monkeypatch):
    """An importable package ``my_pkg.my_rewards`` with plain reward functions, as a user would write them."""
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "my_rewards.py").write_text(textwrap.dedent("""
        def length_bonus(prompts, completions, **columns):
            return [len(completion.split()) for completion in completions]

        def not_a_number(prompts, completions, **columns):
            return [float("nan")] * len(completions)

        def too_few(prompts, completions, **columns):
            return [1.0]

        def strings(prompts, completions, **columns):
            return ["high"] * len(completions)

        def huge(prompts, completions, **columns):
            return [1e39] * len(completions)

        CONSTANT = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_pkg.my_rewards"


# ---- rule-based rewards ------------------------------------------------------------------------------------------
def test_arithmetic_reward_reads_the_first_number_in_digits_or_words():
    reward = ArithmeticReward()
    completions = ["12.", " twelve", "1 2", "no number", " The answer is 12, not 13.", " 13 or 12", " Twelve",
                   "12.5", " twenty-one", " twenty one", " one hundred and five"]
    answers = ["12"] * 8 + [21, "21", "105"]
    assert reward(["?"] * len(completions), completions, answer=answers) == [1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 1]


def test_arithmetic_reward_accepts_correct_answers_to_the_corpus_problems():
    problems = arithmetic_problems(20, seed=3)
    answers = [problem.answer for problem in problems]
    prompts = [problem.prompt for problem in problems]
    reward = ArithmeticReward()
    assert reward(prompts, [f" {answer}." for answer in answers], answer=answers) == [1.0] * 20
    assert reward(prompts, [f" It is {number_words(int(a))}." for a in answers], answer=answers) == [1.0] * 20
    assert reward(prompts, [f" {int(a) + 1}" for a in answers], answer=answers) == [0.0] * 20
    assert reward(["7 plus 5 is"], [" 12. Mara lives in Ashford."], answer=["12"]) == [1.0]


def test_arithmetic_reward_rejects_a_non_integer_answer_column():
    with pytest.raises(ValueError, match="'answer' must hold integers"):
        ArithmeticReward()(["?"], ["12"], answer=["twelve"])


def test_repetition_penalty_reference_values():
    reward = RepetitionPenalty(n=3)
    completions = ["a b c a b c", "a b c d e", "a b", "x x x x x", ""]
    # "a b c a b c": abc bca cab abc -> 1 of 4 repeats; "x x x x x": xxx xxx xxx -> 2 of 3.
    assert reward([""] * 5, completions) == [-0.25, 0.0, 0.0, -2 / 3, 0.0]
    assert RepetitionPenalty(n=1)([""], ["the cat and the dog"]) == [-0.2]
    with pytest.raises(ValueError, match="n must be >= 1"):
        RepetitionPenalty(n=0)


def test_reference_match_exact_and_f1_use_squad_normalisation():
    exact, f1 = ReferenceMatch("exact"), ReferenceMatch("f1")
    completions = [" The Cat!", " a dog", " a black cat", "Paris"]
    answers = ["cat", ["cat", "dog"], "the cat sat", ["London", "Rome"]]
    assert exact([""] * 4, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]
    # "black cat" vs "cat sat": one common token, precision = recall = 1/2.
    assert f1([""] * 4, completions, answer=answers) == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_reference_match_bleu_reference_value():
    bleu = ReferenceMatch("bleu", column="reference")
    # Clipped n-gram matches 5/6, 3/5, 2/4, 1/4·3; add-one smoothing of orders 2-4 gives 5/6, 4/6, 3/5, 2/4;
    # equal lengths, so no brevity penalty.
    expected = (5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    score, = bleu([""], ["the cat sat on the mat"], reference=["the cat sat on a mat"])
    assert score == pytest.approx(expected, abs=1e-6)
    # The best of several references counts.
    assert bleu([""], ["the cat sat on the mat"], reference=[["a dog ran", "the cat sat on a mat"]]) == \
        pytest.approx([expected], abs=1e-6)
    # Shorter than 4 words: no 4-gram can match and torchmetrics returns 0; unigram BLEU suits one-word answers.
    assert bleu([""], ["Paris"], reference=["Paris"]) == [0.0]
    assert ReferenceMatch("bleu", bleu_n_gram=1)([""], ["Paris"], answer=[["London", "Paris"]]) == [1.0]


def test_reference_match_rejects_unknown_metric_and_bad_column_values():
    with pytest.raises(ValueError, match="metric must be one of"):
        ReferenceMatch("rouge")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        ReferenceMatch("exact")([""], ["x"], answer=[[]])


# ---- the weighted sum, errors, callables, YAML -------------------------------------------------------------------
def test_weighted_rewards_sum_raw_values_and_unique_names(reward_functions):
    rewards = [ArithmeticReward(), RepetitionPenalty(n=1), ArithmeticReward(column="other"),
               CallableReward(f"{reward_functions}.length_bonus"), CallableReward(f"{reward_functions}:length_bonus",
                                                                                   name="words")]
    combined = WeightedRewards(rewards, [1.0, 2.0, 0.5, 0.1, -1.0])
    completions = [" 12", " 5 5 5 5"]
    total, parts = combined(["What is 7 plus 5?", "What is 2 plus 3?"], completions, answer=["12", "5"],
                            other=["12", "12"], unused=[None, None])
    assert list(parts) == ["arithmetic_reward_1", "repetition_penalty", "arithmetic_reward_2", "length_bonus", "words"]
    expected_parts = {"arithmetic_reward_1": [1.0, 1.0], "repetition_penalty": [0.0, -0.75],
                      "arithmetic_reward_2": [1.0, 0.0], "length_bonus": [1.0, 4.0], "words": [1.0, 4.0]}
    for name, values in expected_parts.items():
        torch.testing.assert_close(parts[name], torch.tensor(values))
    expected_total = torch.tensor([1 + 0 + 0.5 + 0.1 - 1, 1 - 1.5 + 0 + 0.4 - 4])
    torch.testing.assert_close(total, expected_total)
    assert total.dtype == torch.float32 and total.device.type == "cpu"


def test_weighted_rewards_validation_errors(reward_functions):
    with pytest.raises(ValueError, match="2 reward weights for 1 rewards"):
        WeightedRewards([ArithmeticReward()], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one reward"):
        WeightedRewards([])
    with pytest.raises(TypeError, match="wrap a plain function in CallableReward"):
        WeightedRewards([lambda prompts, completions: [0.0]])
    with pytest.raises(ValueError, match=r"other lengths: \{'answer': 1\}"):
        WeightedRewards([ArithmeticReward()])(["a", "b"], ["1", "2"], answer=["1"])
    for function, error, message in [("not_a_number", ValueError, "returned non-finite values at positions \\[0, 1\\]"),
                                     ("too_few", ValueError, "returned 1 values for 2 completions"),
                                     ("strings", TypeError, "must return real numbers, got str")]:
        with pytest.raises(error, match=f"reward '{reward_functions}.{function}' {message}"):
            WeightedRewards([CallableReward(f"{reward_functions}.{function}")])(["a", "b"], ["1", "2"])
    with pytest.raises(ValueError, match="overflows fp32"):
        WeightedRewards([CallableReward(f"{reward_functions}.huge")])(["a"], ["1"])


def test_missing_column_names_the_reward_the_column_and_the_given_columns():
    with pytest.raises(KeyError) as caught:
        WeightedRewards([RepetitionPenalty(), ReferenceMatch("f1", column="gold")])(["p"], ["c"], answer=["x"], id=[0])
    assert isinstance(caught.value, MissingColumnError)
    assert str(caught.value) == ("ReferenceMatch needs the dataset column 'gold'; the batch has the columns "
                                 "['answer', 'id']")


def test_callable_reward_import_errors(reward_functions):
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg.mod'"):
        CallableReward("no_such_pkg.mod.f")
    with pytest.raises(ImportError, match="has no attribute 'missing'"):
        CallableReward(f"{reward_functions}:missing")
    with pytest.raises(ImportError, match="is no import path"):
        CallableReward("length_bonus")
    with pytest.raises(TypeError, match="is not callable \\(type int\\)"):
        CallableReward(f"{reward_functions}.CONSTANT")


def test_rewards_and_weights_from_yaml_through_jsonargparse(reward_functions):
    parser = ArgumentParser()
    parser.add_argument("--rewards", type=list[Reward])
    parser.add_argument("--reward_weights", type=list[float])
    config = parser.parse_string(textwrap.dedent(f"""
        rewards:
          - class_path: lit_distill.rewards.ArithmeticReward
          - class_path: lit_distill.rewards.CallableReward
            init_args: {{function: {reward_functions}.length_bonus}}
        reward_weights: [1.0, 0.1]
    """))
    built = parser.instantiate_classes(config)
    assert [type(reward) for reward in built.rewards] == [ArithmeticReward, CallableReward]
    total, parts = WeightedRewards(built.rewards, built.reward_weights)(["What is 7 plus 5?"], [" 12 apples"],
                                                                        answer=["12"])
    torch.testing.assert_close(total, torch.tensor([1.0 + 0.1 * 2]))
    assert list(parts) == ["arithmetic_reward", "length_bonus"]


def test_load_reward_model_lives_in_the_model_layer():
    from lit_distill import models, modules
    assert modules.load_reward_model is models.load_reward_model


# ---- model-based rewards -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inverse_loss(llama_dir):
    return InverseLoss(ModelSpec(name_or_path=llama_dir), batch_size=2)


def naive_mean_nll(model, tokenizer, prompt, completion):
    """Mean NLL of the completion tokens after the prompt, one unpadded sequence at a time."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)  # each predicts the next token
    return -sum(logprobs[t, ids[0, t + 1]].item() for t in positions) / len(completion_ids)


def test_inverse_loss_matches_a_naive_per_example_loop(inverse_loss, llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    prompts, completions = PROMPTS + ["7 plus 5 is"], COMPLETIONS + [" 12."]
    expected = [-naive_mean_nll(model, tokenizer, p, c) for p, c in zip(prompts, completions)]
    assert inverse_loss(prompts, completions) == pytest.approx(expected, abs=1e-5)
    # Half the batch empty: empty completions get -log V, the others are unchanged.
    mixed = inverse_loss(prompts, ["", completions[1], "", completions[3]])
    assert mixed == pytest.approx([-math.log(len(tokenizer)), expected[1], -math.log(len(tokenizer)), expected[3]],
                                  abs=1e-5)


def test_inverse_loss_pads_correctly_for_absolute_positions(gpt2_dirs, tokenizer):
    # GPT-2's learned absolute positions expose any left-padding position-id error (Llama's RoPE would hide an offset).
    reward = InverseLoss(ModelSpec(name_or_path=gpt2_dirs[1]), batch_size=3)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dirs[1]).eval()
    expected = [-naive_mean_nll(model, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-5)


def test_inverse_loss_perplexity_truncation_and_empty_reward(llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    perplexity = InverseLoss(ModelSpec(name_or_path=llama_dir), kind="perplexity", empty_reward=-5.0)
    expected = [-math.exp(naive_mean_nll(model, tokenizer, p, c)) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert perplexity(PROMPTS, COMPLETIONS) == pytest.approx(expected, rel=1e-5)
    assert perplexity(["a"], [""]) == [-5.0]
    # max_length 6: the completion keeps its first 5 tokens, the prompt its last token.
    short = InverseLoss(ModelSpec(name_or_path=llama_dir), max_length=6)
    prompt_ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(COMPLETIONS[2], add_special_tokens=False)["input_ids"]
    assert len(completion_ids) > 5
    cut_prompt, cut_completion = tokenizer.decode(prompt_ids[-1:]), tokenizer.decode(completion_ids[:5])
    assert short(PROMPTS[:1], COMPLETIONS[2:]) == pytest.approx(
        [-naive_mean_nll(model, tokenizer, cut_prompt, cut_completion)], abs=1e-5)
    with pytest.raises(ValueError, match="kind must be one of"):
        InverseLoss(ModelSpec(name_or_path=llama_dir), kind="loss")


def test_model_rewards_stay_frozen_and_in_eval_mode(inverse_loss):
    parent = torch.nn.Module()
    parent.rewards = WeightedRewards([inverse_loss])
    parent.train()
    assert inverse_loss.training  # the flag follows, the model does not
    assert not any(module.training for module in inverse_loss.model.modules())
    assert not any(p.requires_grad for p in inverse_loss.parameters())


def test_token_embedding_cosine_matches_a_naive_computation(llama_dir, tokenizer):
    reward = TokenEmbeddingCosine(ModelSpec(name_or_path=llama_dir))
    assert not hasattr(reward, "model")  # only the embedding matrix is kept
    weight = AutoModelForCausalLM.from_pretrained(llama_dir).get_input_embeddings().weight.detach()  # (V, H)

    def mean_vector(text):
        return weight[tokenizer(text, add_special_tokens=False)["input_ids"]].mean(0)

    references = ["Mara is a teacher.", "12", "Ben likes soup."]
    expected = [(mean_vector(c) @ mean_vector(r) / (mean_vector(c).norm() * mean_vector(r).norm())).item()
                for c, r in zip(COMPLETIONS, references)]
    assert reward(PROMPTS, COMPLETIONS, reference=references) == pytest.approx(expected, abs=1e-6)
    assert reward(["p", "p"], ["", "same words"], reference=["anything", "same words"]) == pytest.approx([0.0, 1.0])


WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "in", "park", "paris", "london", "is", "big", "small"]


def save_sentence_encoder(path, pooling=None, extra_modules=()):
    """A tiny BERT + tokenizer in sentence-transformers layout (or a plain encoder directory without ``pooling``)."""
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
                   *extra_modules]
        (path / "modules.json").write_text(json.dumps(modules))
        (path / "1_Pooling").mkdir()
        flags = {f"pooling_mode_{mode}": mode == pooling for mode in
                 ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")}
        (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **flags}))
        (path / "2_Normalize").mkdir()
    return str(path)


@pytest.mark.parametrize("pooling", [None, "mean_tokens", "cls_token", "max_tokens", "lasttoken"])
def test_sentence_embedding_cosine_matches_unpadded_encoding(tmp_path, pooling):
    path = save_sentence_encoder(tmp_path, pooling)
    reward = SentenceEmbeddingCosine(path, batch_size=2)
    encoder, tokenizer = BertModel.from_pretrained(path).eval(), BertTokenizer.from_pretrained(path)
    take = {None: lambda h: h.mean(0), "mean_tokens": lambda h: h.mean(0), "cls_token": lambda h: h[0],
            "max_tokens": lambda h: h.amax(0), "lasttoken": lambda h: h[-1]}[pooling]

    def embedding(text):  # one text alone: no padding, every token real
        with torch.no_grad():
            return take(encoder(**tokenizer(text, return_tensors="pt")).last_hidden_state[0])

    completions = ["the cat sat on a mat", "dog", "paris is big", "a small park in london"]
    references = ["a cat sat on the mat", "the dog ran in the park", "london is big", "small"]
    expected = [F.cosine_similarity(embedding(c), embedding(r), dim=0).item() for c, r in zip(completions, references)]
    assert reward([""] * 4, completions, reference=references) == pytest.approx(expected, abs=1e-5)
    assert reward(["", ""], ["  ", "dog ran"], reference=["dog", "dog ran"]) == pytest.approx([0.0, 1.0], abs=1e-6)


def test_sentence_embedding_cosine_refuses_modules_it_would_skip(tmp_path):
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    with pytest.raises(ValueError, match="models.Dense' .* is not supported"):
        SentenceEmbeddingCosine(save_sentence_encoder(tmp_path / "dense", "mean_tokens", [dense]))
    with pytest.raises(ValueError, match="pooling_mode_weightedmean_tokens"):
        SentenceEmbeddingCosine(save_sentence_encoder(tmp_path / "weighted", "weightedmean_tokens"))


def test_reward_model_score_equals_reward_module_scores(tmp_path, tokenizer):
    from lit_distill.modules import RewardModule

    torch.manual_seed(0)
    module = RewardModule(model=ModelSpec(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                                  "num_hidden_layers": 1, "num_attention_heads": 4},
                                          tokenizer=TOKENIZER)).eval()
    with torch.no_grad():  # a non-trivial head, so that equal scores mean the saved head was loaded
        module.score_head.weight.normal_()
    module.save_pretrained(str(tmp_path / "rm"))
    reward = RewardModelScore(str(tmp_path / "rm"), batch_size=2)
    expected = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS):  # one unpadded sequence at a time, completion + EOS
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + \
            tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            expected.append(module.scores(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item())
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) == 3
    with pytest.raises(FileNotFoundError, match="no score_head.pt"):
        RewardModelScore(str(tmp_path))
