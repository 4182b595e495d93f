"""Preference pairs: SQuAD corruptions and the JSONL loader."""

import json
import logging
import random

import pytest
import torch

from lit_distill.data import corpus
from lit_distill.data.collate import IGNORE_INDEX, tokenize
from lit_distill.data.io import DataFileError
from lit_distill.data.preference import (CORRUPTIONS, JSONLPreferenceDataModule, SQuADPreferenceDataModule, corrupt,
                                         normalize_answer)
from lit_distill.data.squad import SQuADExample

EXAMPLES = [SQuADExample(e.id, e.context, e.question, (e.answer,)) for e in corpus.qa_examples(200, seed=5)]
SUPER_BOWL = SQuADExample("sb", "The Denver Broncos defeated the Carolina Panthers 24-10 in Super Bowl 50, played in "
                                "1990 at Levi's Stadium.", "Who won Super Bowl 50?", ("Denver Broncos", "Broncos"))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_differs_from_the_gold_and_is_seeded(name):
    applied = 0
    for example in EXAMPLES + [SUPER_BOWL]:
        result = corrupt(example, EXAMPLES, random.Random(f"0:{example.id}"), [name], [1.0])
        if result is None:
            continue
        applied += 1
        rejected = result[1]
        assert rejected.strip() and all(normalize_answer(rejected) != normalize_answer(a) for a in example.answers)
        assert result == corrupt(example, EXAMPLES, random.Random(f"0:{example.id}"), [name], [1.0])
    assert applied >= 0.8 * len(EXAMPLES)  # each kind applies to most corpus answers


def test_corruptions_do_what_they_say():
    rng = random.Random(0)
    # Another capitalised two-word span; "the Denver" (a function word, part of the gold) never.
    assert CORRUPTIONS["wrong_span"](SUPER_BOWL, EXAMPLES, rng) in {"Carolina Panthers", "Super Bowl", "Levi's Stadium"}
    assert CORRUPTIONS["truncated"](SUPER_BOWL, EXAMPLES, rng) == "Denver"
    assert CORRUPTIONS["shuffled"](SUPER_BOWL, EXAMPLES, rng) == "Broncos Denver"
    assert CORRUPTIONS["other_question"](SUPER_BOWL, EXAMPLES, rng) in {e.answers[0] for e in EXAMPLES}
    one_word = SQuADExample("w", "Mara has a cat.", "What pet does Mara have?", ("cat",))
    assert sorted(CORRUPTIONS["shuffled"](one_word, EXAMPLES, rng)) == sorted("cat")
    assert CORRUPTIONS["truncated"](one_word, EXAMPLES, rng) == "c"
    assert CORRUPTIONS["shuffled"](SQuADExample("x", "a", "q", ("aAa",)), EXAMPLES, rng) is None
    coco = SQuADExample("x", "a", "q", ("Coco",))
    assert all(CORRUPTIONS["shuffled"](coco, EXAMPLES, random.Random(i)).lower() != "coco" for i in range(50))
    # A corpus value is replaced by another value of its kind in the context: a colour by a colour.
    colour = next(e for e in EXAMPLES if e.answers[0] in corpus.COLOURS
                  and sum(c in e.context.split() or c + "." in e.context.split() for c in corpus.COLOURS) > 1)
    assert CORRUPTIONS["wrong_span"](colour, EXAMPLES, rng) in set(corpus.COLOURS) - {colour.answers[0]}


def test_corrupt_falls_back_when_the_drawn_corruption_does_not_apply():
    single_char = SQuADExample("c", "Tomas is 7 years old. Mara is 9.", "How old is Tomas?", ("7",))
    name, rejected = corrupt(single_char, EXAMPLES, random.Random(0), ["truncated", "wrong_span"], [1.0, 0.0001])
    assert (name, rejected) == ("wrong_span", "9")  # "7" cannot be truncated
    assert corrupt(single_char, EXAMPLES, random.Random(0), ["truncated"], [1.0]) is None


def test_squad_preference_pairs_are_deterministic_by_seed_and_batched():
    def build(seed):
        dm = SQuADPreferenceDataModule(embedded_examples=50, batch_size=4, seed=seed,
                                       corruption_weights=[1.0, 1.0, 1.0, 1.0])
        dm.setup("fit")
        return dm

    first, again, other = build(0), build(0), build(1)
    assert first.datasets["train"] == again.datasets["train"]
    assert first.datasets["train"] != other.datasets["train"]
    assert len(first.datasets["validation"]) == 5
    tok = first.tokenizer
    for pair in first.datasets["train"]:
        chosen = tok.decode([t for t in pair["chosen_labels"] if t != IGNORE_INDEX])
        rejected = tok.decode([t for t in pair["rejected_labels"] if t != IGNORE_INDEX])
        assert chosen != rejected and chosen.endswith(tok.eos_token) and rejected.endswith(tok.eos_token)
        prompt_length = len(pair["prompt_ids"])
        assert pair["chosen_input_ids"][:prompt_length] == pair["rejected_input_ids"][:prompt_length]
    batch = next(iter(first.train_dataloader()))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert torch.equal(batch["margin"], torch.zeros(4))


def test_only_selected_corruptions_are_used():
    dm = SQuADPreferenceDataModule(embedded_examples=30, corruptions=["shuffled"])
    tok = dm.tokenizer
    for pair in dm.build_split("train"):
        chosen = tok.decode([t for t in pair["chosen_labels"] if t != IGNORE_INDEX])
        rejected = tok.decode([t for t in pair["rejected_labels"] if t != IGNORE_INDEX])
        assert sorted(chosen) == sorted(rejected) and chosen != rejected
    with pytest.raises(ValueError, match="corruptions"):
        SQuADPreferenceDataModule(corruptions=["typo"])
    with pytest.raises(ValueError, match="corruption_weights"):
        SQuADPreferenceDataModule(corruptions=["shuffled"], corruption_weights=[1.0, 2.0])


# ---- JSONL ------------------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


PAIRS = [{"prompt": "Where does Mara live?", "chosen": " Ashford", "rejected": " Redcliff", "margin": 2.5},
         {"prompt": "How old is Tomas, who lives in Brightwater?", "chosen": " 42", "rejected": " 24 years"}]


def test_jsonl_happy_path_with_margin_and_label_masks(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "validation.jsonl", PAIRS[:1])
    dm = JSONLPreferenceDataModule(source=str(tmp_path), batch_size=2)
    dm.setup("fit")
    batch = next(iter(torch.utils.data.DataLoader(dm.datasets["train"], batch_size=2,
                                                  collate_fn=dm.collate_fn("train"))))
    assert torch.equal(batch["margin"], torch.tensor([2.5, 0.0]))
    tok = dm.tokenizer
    for row, pair in enumerate(PAIRS):
        prompt_length = len(tokenize(tok, pair["prompt"]))
        for side in ("chosen", "rejected"):
            completion = tokenize(tok, pair[side]) + [tok.eos_token_id]
            ids, labels = batch[f"{side}_input_ids"][row], batch[f"{side}_labels"][row]
            length = prompt_length + len(completion)
            assert ids[:length].tolist() == tokenize(tok, pair["prompt"]) + completion
            assert labels[:prompt_length].eq(IGNORE_INDEX).all() and labels[length:].eq(IGNORE_INDEX).all()
            assert labels[prompt_length:length].tolist() == completion
            assert batch[f"{side}_attention_mask"][row].sum() == length
            assert ids[length:].eq(tok.pad_token_id).all()
    assert len(dm.datasets["validation"]) == 1


def test_jsonl_missing_rejected_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], "", {"prompt": "p", "chosen": " a"}])
    with pytest.raises(DataFileError, match=r"pairs\.jsonl:3: missing field\(s\) \['rejected'\]"):
        JSONLPreferenceDataModule(source=path).setup("fit")
    path = write_jsonl(tmp_path / "margin.jsonl", [PAIRS[0], {**PAIRS[1], "margin": "big"}])
    with pytest.raises(DataFileError, match=r"margin\.jsonl:2: field 'margin' must be a number"):
        JSONLPreferenceDataModule(source=path).setup("fit")


def test_jsonl_chosen_equal_rejected_is_skipped_counted_and_logged(tmp_path, caplog):
    same = {"prompt": "Where does Ada live?", "chosen": " Oakridge", "rejected": " Oakridge"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], same, PAIRS[1], "", same, PAIRS[0]])
    dm = JSONLPreferenceDataModule(source=path, validation_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="lit_distill.data.collate"):
        train = dm.build_split("train")
    assert len(train) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one warning for the split, not one per line
    assert "skipped 2 of 5 examples" in warnings[0].getMessage()
    assert "chosen == rejected: 2" in warnings[0].getMessage()
    assert "line 2, line 5" in warnings[0].getMessage()  # file line numbers, blank lines counted
    with pytest.raises(DataFileError, match=r"pairs\.jsonl:2: chosen == rejected"):
        JSONLPreferenceDataModule(source=path, validation_fraction=0.0, on_invalid="error").build_split("train")


def test_jsonl_over_long_pairs_are_skipped_or_raise(tmp_path, caplog):
    long = {"prompt": "Q?", "chosen": " Ashford" * 40, "rejected": " no"}
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS + [long])
    dm = JSONLPreferenceDataModule(source=path, validation_fraction=0.0, max_length=24)
    with caplog.at_level(logging.WARNING, logger="lit_distill.data.collate"):
        assert len(dm.build_split("train")) == 2
    assert "skipped 1 of 3" in caplog.text and "line 3" in caplog.text
    with pytest.raises(DataFileError, match=r"pairs\.jsonl:3: .*no room for a prompt token"):
        JSONLPreferenceDataModule(source=path, validation_fraction=0.0, max_length=24,
                                  on_invalid="error").build_split("train")


def test_jsonl_prompt_goes_through_the_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    dm = JSONLPreferenceDataModule(source=path, validation_fraction=0.0, chat_template="default")
    pair = dm.build_split("train")[0]
    assert dm.tokenizer.decode(pair["prompt_ids"]) == "<|user|>\nWhere does Mara live?\n<|assistant|>\n"


def test_squad_file_examples_without_an_applicable_corruption_are_counted(tmp_path, caplog):
    qas = [{"id": "a", "question": "Where does Mara live?", "answers": [{"text": "Ashford", "answer_start": 14}]},
           {"id": "b", "question": "How many cats?", "answers": [{"text": "7", "answer_start": 26}]}]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "Mara lives in Ashford with 7 cats.",
                                                           "qas": qas}]}]}))
    dm = SQuADPreferenceDataModule(source=str(path), validation_fraction=0.0, corruptions=["truncated"],
                                   truncation="error")  # strict about length, not about corruptions
    with caplog.at_level(logging.WARNING, logger="lit_distill.data.collate"):
        pairs = dm.build_split("train")
    assert len(pairs) == 1
    assert dm.tokenizer.decode([t for t in pairs[0]["rejected_labels"] if t != IGNORE_INDEX]) == " Ash<|endoftext|>"
    assert "skipped 1 of 2" in caplog.text and "no corruption applies: 1" in caplog.text and "b" in caplog.text
