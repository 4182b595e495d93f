"""Dialog and bilingual adapters: rows in the hub formats become WikiText-style packed language-modelling blocks."""

import inspect
import json
import re

import pytest
import torch

from lit_distill.cli import LitDistillCLI
from lit_distill.data import BilingualDataModule, DialogDataModule, WikiTextDataModule, corpus
from lit_distill.data.io import DataFileError
from lit_distill.data.text import pack


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return DialogDataModule().tokenizer


def test_dialog_turns_are_concatenated_as_documented(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [
        {"dialog": [" Say , Jim , how about a beer ? ", "Sure .", "Great !"], "act": [3, 4, 1]},  # DailyDialog
        {"dialog": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},  # chat
        {"dialog": [{"from": "human", "value": "Why?"}, {"value": "Because."}]},  # ShareGPT, one speaker missing
    ])
    (tmp_path / "validation.jsonl").write_text("")
    assert DialogDataModule(source=str(tmp_path)).split_texts("train") == [
        "A: Say , Jim , how about a beer ?\nB: Sure .\nA: Great !",
        "user: Hi\nassistant: Hello!",
        "human: Why?\nB: Because.",
    ]
    custom = DialogDataModule(source=str(tmp_path), speakers=["Customer", "Agent"], turn_format="<{speaker}> {text}",
                              turn_separator=" | ")
    assert custom.split_texts("train")[0] == ("<Customer> Say , Jim , how about a beer ? | <Agent> Sure . | "
                                              "<Customer> Great !")
    assert DialogDataModule(source=str(tmp_path), turn_format="{text}").split_texts("train")[1] == "Hi\nHello!"


def test_dialog_text_field_selects_the_turns(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": f"Question {i}?"},
                                                                {"role": "assistant", "content": f"Answer {i}."}]}
                                                  for i in range(20)])
    dm = DialogDataModule(source=str(path), text_field="messages", validation_fraction=0.05)
    assert dm.split_texts("validation") == ["user: Question 0?\nassistant: Answer 0."]
    assert len(dm.split_texts("train")) == 19


@pytest.mark.parametrize("row, message", [
    ({"text": "no turns"}, r"rows.jsonl:2: missing field 'dialog' \(the list of turns\); the row has \['text'\]"),
    ({"dialog": []}, r"rows.jsonl:2: field 'dialog': expected a non-empty list of turns"),
    ({"dialog": "Hi ."}, r"rows.jsonl:2: field 'dialog': expected a non-empty list of turns"),
    ({"dialog": ["Hi .", 3]}, r"rows.jsonl:2: field 'dialog', turn 1: expected a string or an object with a string "
                              r"content or value"),
    ({"dialog": [{"role": "user", "text": "Hi"}]}, r"rows.jsonl:2: field 'dialog', turn 0: expected a string"),
    ({"dialog": [{"role": 1, "content": "Hi"}]}, r"rows.jsonl:2: field 'dialog', turn 0: expected a string"),
])
def test_malformed_dialog_rows_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"dialog": ["Hi .", "Hello ."]}, row])
    with pytest.raises(DataFileError, match=message):
        DialogDataModule(source=str(path)).split_texts("train")


def test_dialog_turn_format_is_checked():
    with pytest.raises(ValueError, match=r"turn_format '\{name\}: \{text\}' may only use"):
        DialogDataModule(turn_format="{name}: {text}")
    with pytest.raises(ValueError, match="at least one speaker"):
        DialogDataModule(speakers=[])


def test_bilingual_extracts_one_language_from_nested_and_flat_rows(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [
        {"translation": {"de": "Guten Morgen .", "en": "Good morning ."}},  # WMT/OPUS
        {"id": "7", "de": "Danke .", "en": "Thank you ."},  # flat
    ])
    write_jsonl(tmp_path / "valid.jsonl", [{"translation": {"de": "Ja .", "en": "Yes ."}}])
    assert BilingualDataModule("de", source=str(tmp_path)).split_texts("train") == ["Guten Morgen .", "Danke ."]
    english = BilingualDataModule("en", source=str(tmp_path))
    assert english.split_texts("train") == ["Good morning .", "Thank you ."]
    assert english.split_texts("validation") == ["Yes ."]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"pair": {"fr": "Oui .", "en": "Yes ."}}])
    assert BilingualDataModule("fr", source=str(pairs), text_field="pair", validation_fraction=0).split_texts(
        "train") == ["Oui ."]


def test_bilingual_parquet_in_the_hub_shape(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"translation": {"de": f"Satz {i} .", "en": f"Sentence {i} ."}} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "wmt.parquet")
    dm = BilingualDataModule("de", source=str(tmp_path / "wmt.parquet"), validation_fraction=0.25)
    assert dm.split_texts("validation") == [f"Satz {i} ." for i in range(5)]
    assert dm.split_texts("train")[0] == "Satz 5 ."
    pq.write_table(pa.Table.from_pylist(rows[:2] + [{"translation": {"de": "Nein .", "en": None}}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataFileError, match=r"bad.parquet: row 2: field 'translation': no 'en' text; the languages "
                                            r"present are \['de'\]"):
        BilingualDataModule("en", source=str(tmp_path / "bad.parquet")).split_texts("train")


@pytest.mark.parametrize("row, message", [
    ({"translation": {"de": "Nein .", "fr": "Non ."}},
     r"rows.jsonl:3: field 'translation': no 'en' text; the languages present are \['de', 'fr'\]"),
    ({"de": "Nein .", "id": 3}, r"rows.jsonl:3: no 'en' text; the languages present are \['de', 'id'\]"),
    ({"translation": "Nein ."}, r"rows.jsonl:3: field 'translation' must be an object \{language: text\}, got str"),
    ({"translation": {"en": ["No", "."]}}, r"rows.jsonl:3: field 'translation': field 'en' must be a string"),
])
def test_malformed_bilingual_rows_name_file_line_and_languages(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"translation": {"de": "Ja .", "en": "Yes ."}}) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataFileError, match=message):
        BilingualDataModule("en", source=str(path)).split_texts("train")


def test_text_files_are_rejected_with_the_expected_types(tmp_path):
    (tmp_path / "dialogs.txt").write_text("A: Hi\n")
    with pytest.raises(DataFileError, match=r"dialogs.txt: unsupported file type '.txt'; expected one of"):
        DialogDataModule(source=str(tmp_path / "dialogs.txt")).split_texts("train")


def test_hub_rows_go_through_the_same_rendering(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"translation": {"de": "Hallo .", "en": "Hello ."}},
                                           {"translation": {"de": "Tschüss ."}}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dm = BilingualDataModule("en", source="hub")
    with pytest.raises(DataFileError, match=r"wmt/wmt16 validation row 1: field 'translation': no 'en' text"):
        dm.split_texts("validation")
    assert calls == [("wmt/wmt16", "de-en", "validation")]
    assert BilingualDataModule("de", source="hub").split_texts("train") == ["Hallo .", "Tschüss ."]


def test_blocks_are_packed_as_wikitext(tmp_path, tokenizer):
    dialogs = corpus.dialogs(60, seed=5)
    texts = DialogDataModule(speakers=["Q", "R"]).embedded_texts(60, seed=5)
    assert texts[0] == "\n".join(f"{'QR'[index % 2]}: {turn}" for index, turn in enumerate(dialogs[0]))
    for name, rows in (("dialogs", [{"dialog": turns} for turns in dialogs]), ("texts", [{"text": t} for t in texts])):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "train.jsonl", rows)
        write_jsonl(tmp_path / name / "validation.jsonl", rows[:10])
    dialog_dm = DialogDataModule(source=str(tmp_path / "dialogs"), speakers=["Q", "R"], block_size=32)
    wikitext_dm = WikiTextDataModule(source=str(tmp_path / "texts"), min_chars=1, block_size=32)
    dialog_dm.setup("fit")
    wikitext_dm.setup("fit")
    expected = pack(tokenizer(texts, add_special_tokens=False)["input_ids"], 32, tokenizer.eos_token_id)
    assert torch.equal(dialog_dm.datasets["train"].blocks, expected)
    assert torch.equal(wikitext_dm.datasets["train"].blocks, expected)
    item = dialog_dm.datasets["train"][0]
    assert set(item) == {"input_ids", "attention_mask", "labels"} and torch.equal(item["labels"], item["input_ids"])
    batch = next(iter(dialog_dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32)


def test_embedded_sources_build_disjoint_splits(tokenizer):
    for dm in (DialogDataModule(embedded_documents=60, block_size=32), BilingualDataModule("xx", block_size=32,
                                                                                         embedded_documents=60)):
        dm.setup("fit")
        train, validation = dm.datasets["train"].blocks, dm.datasets["validation"].blocks
        assert len(train) > 5 * len(validation) > 0
        assert not torch.equal(train[0], validation[0])
    decoded = tokenizer.decode(dm.datasets["train"].blocks[0].tolist())
    assert len(decoded) > 20 and corpus.bilingual_pairs(1)[0]["xx"].startswith(decoded)
    with pytest.raises(DataFileError, match=r"embedded pair 0: no 'de' text; the languages present are \['en', 'xx'\]"):
        BilingualDataModule("de").setup("fit")


@pytest.mark.parametrize("generate", [corpus.dialogs, corpus.bilingual_pairs])
def test_generators_are_deterministic_and_seeded(generate):
    first = generate(40, seed=3)
    assert len(first) == 40 and first == generate(40, seed=3)
    assert first != generate(40, seed=4)
    assert generate(60, seed=3)[:40] == first  # asking for more only appends
    assert generate(0) == []
    with pytest.raises(ValueError):
        generate(-1)


def test_dialog_answers_follow_from_the_dialog():
    values = set(corpus.CITIES + corpus.JOBS + corpus.ANIMALS + corpus.COLOURS + corpus.PET_NAMES + corpus.NAMES)
    values |= {str(age) for age in range(corpus.MIN_AGE, corpus.MAX_AGE + 1)}
    num_questions = set()
    for turns in corpus.dialogs(300, seed=8):
        name = re.search(r"(\w+)\?$", turns[0]).group(1)
        description = turns[1]
        assert description.startswith(name)
        questions, answers = turns[2:-2:2], turns[3:-2:2]
        num_questions.add(len(questions))
        for question, answer in zip(questions, answers):
            assert question.endswith("?") and name in question
            # every name, town, job, pet, colour or age in an answer was stated in the description
            assert set(re.findall(r"\w+", answer)) & values <= set(re.findall(r"\w+", description)), (answer, turns)
    assert num_questions == {1, 2, 3}


def test_synthetic_language_is_a_harder_letter_substitution(tokenizer):
    pairs = corpus.bilingual_pairs(300, seed=9, max_sentences=2)
    assert {len(re.findall(r"[.] ", pair["en"] + " ")) for pair in pairs} == {1, 2}
    lexicon = {}
    for pair in pairs:
        english, synthetic = pair["en"], pair[corpus.SYNTHETIC_LANGUAGE]
        assert len(english) == len(synthetic) and english != synthetic
        for word, rendering in zip(english.split(), synthetic.split()):
            assert lexicon.setdefault(word, rendering) == rendering  # one fixed rendering per word
    assert len(set(lexicon.values())) == len(lexicon)  # and no two words share one
    assert corpus.to_synthetic_language("Mara is 7.") == "Vizi ub 7."

    def tokens_per_char(language):
        texts = [pair[language] for pair in pairs]
        return sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"])) / sum(map(len, texts))

    assert tokens_per_char("xx") > 2.5 * tokens_per_char("en")


@pytest.mark.parametrize("datamodule", [DialogDataModule(speakers=["Q", "R"]), BilingualDataModule("xx", block_size=8)])
def test_hparams_are_the_own_arguments_and_rebuild_the_datamodule(datamodule):
    assert set(datamodule.hparams) == set(inspect.signature(type(datamodule)).parameters)  # no drop_headings
    assert type(datamodule)(**datamodule.hparams).hparams == datamodule.hparams


def test_datamodules_build_from_a_cli_config(tmp_path):
    model = ("model:\n  class_path: lit_distill.modules.SFTModule\n  init_args:\n    model:\n"
             "      tokenizer: lit-distill/tokenizer\n"
             "      config: {model_type: pico_kgram, context_size: 4, embedding_size: 8, hidden_size: 16}\n"
             f"trainer: {{accelerator: cpu, logger: false, default_root_dir: {tmp_path}}}\n")
    data = {
        DialogDataModule: "data:\n  class_path: lit_distill.data.DialogDataModule\n  init_args:\n"
                          "    source: embedded\n    speakers: [Customer, Assistant]\n    turn_separator: ' | '\n"
                          "    block_size: 32\n",
        BilingualDataModule: "data:\n  class_path: lit_distill.data.BilingualDataModule\n  init_args:\n"
                             "    language: xx\n    embedded_documents: 100\n    block_size: 32\n"
                             "    max_blocks: {validation: 4}\n",
    }
    for expected, snippet in data.items():
        config = tmp_path / "config.yaml"
        config.write_text(model + snippet)
        cli = LitDistillCLI(args=["--config", str(config)], run=False)
        assert type(cli.datamodule) is expected
        # the CLI adds _class_path and _instantiator to the arguments it parsed
        assert {key for key in cli.datamodule.hparams if not key.startswith("_")} == set(
            inspect.signature(expected).parameters)
    assert cli.datamodule.hparams.language == "xx" and cli.datamodule.hparams.max_blocks == {"validation": 4}
    cli.datamodule.setup("validate")
    assert len(cli.datamodule.datasets["validation"]) == 4
