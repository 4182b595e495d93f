"""The embedded corpus generators and the shipped tokenizer trained on them."""

import json
import re
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lit_distill.cli import main
from lit_distill.data import corpus

GENERATORS = [corpus.text_documents, corpus.qa_examples, corpus.arithmetic_problems]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(corpus.default_tokenizer_path())


@pytest.mark.parametrize("generate", GENERATORS)
def test_generators_are_deterministic_and_seeded(generate):
    first = generate(50, seed=3)
    assert len(first) == 50
    assert first == generate(50, seed=3)
    assert first != generate(50, seed=4)
    assert generate(80, seed=3)[:50] == first  # asking for more only appends


@pytest.mark.parametrize("generate", GENERATORS)
def test_generators_count_edge_cases(generate):
    assert generate(0) == []
    with pytest.raises(ValueError):
        generate(-1)


def test_documents_are_short_paragraphs():
    documents = corpus.text_documents(500, seed=1)
    sentence_counts = {len(re.findall(r"[.?!](?: |$)", document)) for document in documents}
    assert sentence_counts == set(range(3, 9))
    assert any(re.search(r"\b(plus|minus|times)\b", document) for document in documents)
    assert len(set(documents)) > 490


def test_document_arithmetic_is_true():
    words = {corpus.number_words(n): n for n in range(101)}
    sums = [match for document in corpus.text_documents(500, seed=2)
            for match in re.findall(r"([\w-]+) (plus|minus|times) ([\w-]+) (?:is|makes) ([\w -]+?)\.", document)]
    assert len(sums) > 50
    for a, op, b, result in sums:
        a, b, result = (int(x) if x.isdigit() else words[x.lower()] for x in (a, b, result))
        assert result == {"plus": a + b, "minus": a - b, "times": a * b}[op]


def test_number_words():
    assert [corpus.number_words(n) for n in (0, 7, 19, 20, 42, 100, 121)] == [
        "zero", "seven", "nineteen", "twenty", "forty-two", "one hundred", "one hundred and twenty-one"]


def test_vocabulary_is_small():
    word_types = {word for document in corpus.text_documents(2000) for word in re.findall(r"[A-Za-z]+|\d+", document)}
    assert 100 < len(word_types) < 600


def test_qa_spans_match_context():
    examples = corpus.qa_examples(1000, seed=5)
    assert len({example.id for example in examples}) == len(examples)
    for example in examples:
        assert example.answer and 1 <= len(example.answer.split()) <= 2
        assert example.context[example.answer_start:example.answer_start + len(example.answer)] == example.answer
        assert example.question.endswith("?")
    assert len({" ".join(example.question.split()[:2]) for example in examples}) >= 6  # several question types


def test_qa_answers_follow_from_the_context():
    """Semantics, not just spans: the answer has the asked kind and sits in a sentence stating that fact."""
    # question pattern -> (allowed answers, a word the answer's sentence must contain)
    kinds = {
        r"Where does \w+ live\?|In which town": (corpus.CITIES, " in "),
        r"What is \w+'s job\?|What does \w+ do for a living\?": (corpus.JOBS, " a"),
        r"What is the name of \w+'s (\w+)\?": (corpus.PET_NAMES, "{0}"),
        r"What pet does": (corpus.ANIMALS, " "),
        r"What colour is \w+'s (\w+)\?": (corpus.COLOURS, "{0}"),
        r"What is \w+'s favourite food\?|What does \w+ like to eat\?": (corpus.FOODS, " "),
        r"What is \w+'s favourite colour\?": (corpus.COLOURS, "colour"),
        r"How old is": ([str(age) for age in range(corpus.MIN_AGE, corpus.MAX_AGE + 1)], " "),
        r"Who is \w+'s best friend\?": (corpus.NAMES, "friend"),
        r"Who is (older|younger), (\w+) or (\w+)\?": (corpus.NAMES, "than"),
    }
    for example in corpus.qa_examples(500, seed=6):
        sentence = next(match.group() for match in re.finditer(r"[^.]+\.", example.context)
                        if match.start() <= example.answer_start < match.end())
        (pattern, (allowed, word)), = [(p, kind) for p, kind in kinds.items() if re.match(p, example.question)]
        groups = re.match(pattern, example.question).groups()
        assert example.answer in allowed and word.format(*groups) in sentence, (example, sentence)
        if "than" in word:
            comparison, first, second = groups
            left, relation, right = re.search(r"(\w+) is (older|younger) than (\w+)", sentence).groups()
            assert {left, right} == {first, second}
            assert example.answer == (left if relation == comparison else right)


def test_arithmetic_answers_are_correct():
    problems = corpus.arithmetic_problems(1000, seed=7, max_operand=12)
    assert len({problem.id for problem in problems}) == len(problems)
    ops = set()
    for problem in problems:
        a, op, b = re.fullmatch(r"(?:What is|How much is|Calculate) (\d+) (plus|minus|times) (\d+)[?.]",
                                problem.prompt).groups()
        a, b = int(a), int(b)
        assert 0 <= a <= 12 and 0 <= b <= 12
        expected = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        assert expected >= 0 and problem.answer == str(expected)
        ops.add(op)
    assert ops == {"plus", "minus", "times"}
    with pytest.raises(ValueError):
        corpus.arithmetic_problems(1, max_operand=0)


def test_generation_is_fast():
    start = time.perf_counter()
    corpus.text_documents(10_000)
    assert time.perf_counter() - start < 2.0


def test_shipped_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|pad|>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id, user, assistant}) == 4
    assert tokenizer.encode("Mara", add_special_tokens=True) == tokenizer.encode("Mara", add_special_tokens=False)


def test_shipped_tokenizer_round_trips(tokenizer):
    texts = corpus.text_documents(50, seed=11) + [e.question for e in corpus.qa_examples(50, seed=11)]
    texts += ["  Héllo wörld!\n\tdouble  spaces , odd .punctuation", "日本語 🙂 ∑ \u200b", " lead",
              "".join(map(chr, range(1, 256)))]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_shipped_tokenizer_compresses_corpus(tokenizer):
    documents = corpus.text_documents(300, seed=99)  # a seed the tokenizer was not trained on
    num_tokens = sum(len(ids) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"])
    num_words = sum(len(document.split()) for document in documents)
    assert num_tokens / num_words < 1.6


def test_shipped_tokenizer_is_reproducible(tmp_path, tokenizer):
    main(["train-tokenizer", "--out-dir", str(tmp_path)])

    shipped = Path(corpus.default_tokenizer_path())
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads((shipped / "tokenizer.json").read_text())
    retrained = AutoTokenizer.from_pretrained(tmp_path)
    texts = corpus.text_documents(20, seed=42)
    assert retrained(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 200_000
