"""Prompt formatting (chat.py), pair encoding and collation (collate.py) and the SQuAD SFT DataModule."""

import copy
import json
import logging

import pytest
import torch

from lit_distill.data.chat import format_prompt
from lit_distill.data.collate import (IGNORE_INDEX, EncodingError, collate_sft, encode_pair, pad_right,
                                      tokenize)
from lit_distill.data.io import DataFileError
from lit_distill.data.squad import SQuADDataModule, read_squad_json


# ---- chat.py ----------------------------------------------------------------------------------------------------

def test_format_prompt_none_returns_the_text_unchanged(tokenizer):
    assert format_prompt(tokenizer, "Where does Mara live?", "none", system="ignored") == "Where does Mara live?"


def test_default_uses_the_builtin_template_when_the_tokenizer_has_none(tokenizer):
    assert tokenizer.chat_template is None  # the shipped tokenizer defines the tokens but no template
    prompt = format_prompt(tokenizer, "Hi there", "default")
    assert prompt == "<|user|>\nHi there\n<|assistant|>\n"
    assert format_prompt(tokenizer, "Hi", "default", system="Be brief.") == "Be brief.\n<|user|>\nHi\n<|assistant|>\n"
    # The role markers are single special tokens, not spelled out in pieces.
    ids = tokenize(tokenizer, prompt)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


def test_default_prefers_the_tokenizers_own_chat_template(tokenizer):
    own = copy.deepcopy(tokenizer)
    own.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}[bot]{% endif %}")
    assert format_prompt(own, "Hi", "default") == "[user] Hi [bot]"
    assert format_prompt(own, "Hi", "default") != format_prompt(tokenizer, "Hi", "default")


def test_chat_template_file_and_missing_file(tokenizer, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}A:{% endif %}")
    assert format_prompt(tokenizer, "Why?", str(template)) == "Q: Why?\nA:"
    with pytest.raises(FileNotFoundError, match="nope.jinja"):
        format_prompt(tokenizer, "Why?", str(tmp_path / "nope.jinja"))


# ---- collate.py -------------------------------------------------------------------------------------------------

def test_prompt_and_completion_are_tokenised_separately(tokenizer):
    prompt, completion = "Question: Where does Mara live?\nAnswer: ", "Paris"
    prompt_ids, completion_ids = tokenize(tokenizer, prompt), tokenize(tokenizer, completion)
    joint = tokenize(tokenizer, prompt + completion)
    assert joint != prompt_ids + completion_ids  # BPE merges " " and "Paris" across the boundary
    pair = encode_pair(tokenizer, prompt, completion, max_length=64)
    assert pair["input_ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert pair["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
    assert pair["prompt_ids"] == prompt_ids


def test_collate_masks_prompt_and_padding_and_keeps_eos_when_pad_is_eos(tokenizer):
    pad_is_eos = copy.deepcopy(tokenizer)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    eos = pad_is_eos.eos_token_id
    assert pad_is_eos.pad_token_id == eos
    examples = [encode_pair(pad_is_eos, "Where does Mara live? Answer:", " Ashford", 64),
                encode_pair(pad_is_eos, "Q: age? A:", " 42 years", 64)]
    batch = collate_sft(examples, pad_token_id=eos, with_prompts=True)
    lengths = [len(e["input_ids"]) for e in examples]
    prompt_lengths = [len(e["prompt_ids"]) for e in examples]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lengths))
    for row, (length, prompt_length) in enumerate(zip(lengths, prompt_lengths)):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        expected_mask = torch.zeros_like(labels, dtype=torch.bool)
        expected_mask[:prompt_length] = True
        expected_mask[length:] = True
        assert torch.equal(labels == IGNORE_INDEX, expected_mask)  # -100 exactly on prompt and padding
        assert labels[length - 1] == eos and ids[length - 1] == eos  # the real EOS is a target
        assert torch.equal(batch["attention_mask"][row], (torch.arange(len(ids)) < length).long())
        # Prompts are left-padded for generation.
        prompt_row = batch["prompt_input_ids"][row]
        assert prompt_row[-prompt_length:].tolist() == examples[row]["prompt_ids"]
        assert batch["prompt_attention_mask"][row].sum() == prompt_length
        assert batch["prompt_attention_mask"][row, -1] == 1


def test_long_prompts_are_truncated_from_the_left(tokenizer):
    prompt = "Context: " + "Mara lives in Ashford. " * 30 + "Question: Where does Mara live?\nAnswer:"
    full = tokenize(tokenizer, prompt)
    completion_length = len(tokenize(tokenizer, " Ashford")) + 1
    pair = encode_pair(tokenizer, prompt, " Ashford", max_length=32)
    assert len(pair["input_ids"]) == 32
    assert pair["prompt_ids"] == full[len(full) - (32 - completion_length):]  # the end of the prompt is kept
    with pytest.raises(EncodingError, match="truncation='error'"):
        encode_pair(tokenizer, prompt, " Ashford", max_length=32, truncation="error")


def test_completion_that_does_not_fit_raises(tokenizer):
    completion = " Ashford and Brightwater and Elmstead and Fernhill"
    completion_length = len(tokenize(tokenizer, completion)) + 1
    with pytest.raises(EncodingError, match="no room for a prompt token"):
        encode_pair(tokenizer, "Answer:", completion, max_length=completion_length)
    # One more token leaves room for one prompt token: the last one.
    pair = encode_pair(tokenizer, "Context: x\nAnswer:", completion, max_length=completion_length + 1)
    assert pair["prompt_ids"] == tokenize(tokenizer, "Context: x\nAnswer:")[-1:]


def test_pad_right():
    assert pad_right([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad_right([[1]], -100, length=3).tolist() == [[1, -100, -100]]


# ---- squad.py ---------------------------------------------------------------------------------------------------

def squad_file(path, articles):
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    return path


ARTICLES = [
    {"title": "Towns", "paragraphs": [
        {"context": "Mara lives in Ashford. She is a baker.",
         "qas": [{"id": "q1", "question": "Where does Mara live?",
                  "answers": [{"text": "Ashford", "answer_start": 14}, {"text": "in Ashford", "answer_start": 11}]},
                 {"id": "q2", "question": "Where does Tomas live?", "answers": [], "is_impossible": True,
                  "plausible_answers": [{"text": "Ashford", "answer_start": 14}]}]},
        {"context": "Tomas is 42 years old.",
         "qas": [{"id": "q3", "question": "How old is Tomas?", "answers": [{"text": "42", "answer_start": 9}]}]},
    ]},
]


def test_read_squad_json_round_trip_skips_and_logs_unanswerable(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lit_distill.data.squad"):
        examples = read_squad_json(squad_file(tmp_path / "squad.json", ARTICLES))
    assert [e.id for e in examples] == ["q1", "q3"]
    assert examples[0].answers == ("Ashford", "in Ashford")
    assert examples[1].context == "Tomas is 42 years old." and examples[1].question == "How old is Tomas?"
    assert "skipped 1 unanswerable" in caplog.text


@pytest.mark.parametrize("break_it, where", [
    (lambda d: d[0]["paragraphs"][1]["qas"][0].pop("answers"),
     r"data\[0\]\.paragraphs\[1\]\.qas\[0\]: missing 'answers'"),
    (lambda d: d[0]["paragraphs"][0].pop("context"), r"data\[0\]\.paragraphs\[0\]: missing 'context'"),
    (lambda d: d[0]["paragraphs"][0]["qas"][0]["answers"][1].update(text=7),
     r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[1\]\.text: expected str, got int"),
])
def test_malformed_squad_file_names_the_json_path(tmp_path, break_it, where):
    articles = copy.deepcopy(ARTICLES)
    break_it(articles)
    path = squad_file(tmp_path / "bad.json", articles)
    with pytest.raises(DataFileError, match=where) as info:
        read_squad_json(path)
    assert str(path) in str(info.value)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [\n  {"paragraphs": ]\n}')
    with pytest.raises(DataFileError, match=r"broken\.json:2: malformed JSON"):
        read_squad_json(path)


def test_embedded_source_batches(tokenizer):
    dm = SQuADDataModule(embedded_examples=60, batch_size=4, max_length=128)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 60 and len(dm.datasets["validation"]) == 6
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4
    example = dm.datasets["train"][0]
    answer_tokens = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert dm.tokenizer.decode(answer_tokens) == " " + example["answers"][0] + dm.tokenizer.eos_token
    assert dm.tokenizer.decode(example["prompt_ids"]).endswith("\nAnswer:")


def test_validation_batches_carry_left_padded_prompts_and_gold_answers(tmp_path):
    articles = copy.deepcopy(ARTICLES)
    articles[0]["paragraphs"][1]["context"] = "Tomas is 42 years old and lives far away from here, in Brightwater."
    dm = SQuADDataModule(source=str(squad_file(tmp_path / "squad.json", articles)), validation_fraction=1.0,
                         eval_batch_size=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["ids"] == ["q1", "q3"]
    assert batch["answers"] == [["Ashford", "in Ashford"], ["42"]]
    prompts, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert (mask[:, -1] == 1).all() and mask[0, 0] == 0  # the shorter first prompt is padded on the left
    for row, example in enumerate(dm.examples("validation")):
        prompt_ids = prompts[row][mask[row].bool()].tolist()
        assert dm.tokenizer.decode(prompt_ids) == (f"Context: {example.context}\nQuestion: {example.question}"
                                                   f"\nAnswer:")


def test_directory_source_with_official_split_names(tmp_path):
    squad_file(tmp_path / "train.json", ARTICLES)
    squad_file(tmp_path / "dev-v2.0.json", [{"title": "Ages", "paragraphs": ARTICLES[0]["paragraphs"][1:]}])
    dm = SQuADDataModule(source=str(tmp_path), batch_size=2)
    dm.setup()
    assert [e["id"] for e in dm.datasets["train"]] == ["q1", "q3"]
    assert [e["id"] for e in dm.datasets["validation"]] == ["q3"]
    assert dm.datasets["test"] == []
    (tmp_path / "dev-v2.0.json").unlink()
    with pytest.raises(FileNotFoundError, match="dev.json"):
        SQuADDataModule(source=str(tmp_path)).setup("validate")


def test_examples_whose_answer_does_not_fit_are_counted_and_logged(tmp_path, caplog):
    articles = copy.deepcopy(ARTICLES)
    articles[0]["paragraphs"][0]["qas"][0]["answers"][0]["text"] = "Ashford " * 40
    dm = SQuADDataModule(source=str(squad_file(tmp_path / "squad.json", articles)), validation_fraction=0.0,
                         max_length=32, max_truncated_fraction=1.0)  # q3 fits only with its context cut
    with caplog.at_level(logging.WARNING):
        train = dm.build_split("train")
    assert [e["id"] for e in train] == ["q3"]
    assert "skipped 1 of 2 examples" in caplog.text and "q1" in caplog.text
    strict = SQuADDataModule(source=dm.hparams.source, validation_fraction=0.0, max_length=32, truncation="error",
                             max_truncated_fraction=1.0)
    with pytest.raises(ValueError, match="example 'q1'"):
        strict.build_split("train")


def test_chat_template_prompts_have_no_leading_space_in_the_completion():
    dm = SQuADDataModule(embedded_examples=4, chat_template="default", max_length=256)
    example = dm.build_split("train")[0]
    text = dm.tokenizer.decode(example["input_ids"])
    assert "<|assistant|>\n" + example["answers"][0] + dm.tokenizer.eos_token == text[text.rindex("<|assistant|>"):]


def test_prompt_template_fields_are_checked():
    with pytest.raises(ValueError, match="prompt_template"):
        SQuADDataModule(prompt_template="{passage} {question}")
