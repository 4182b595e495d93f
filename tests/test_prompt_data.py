"""Prompts for online RL: embedded generators, JSONL files, per-line errors, truncation and left-padded batches."""

import json
import logging
import re

import pytest
import torch
from torch.utils.data import DataLoader

from lit_distill.cli import LitDistillCLI
from lit_distill.data import corpus
from lit_distill.data.collate import tokenize
from lit_distill.data.io import DataFileError
from lit_distill.data.prompts import JSONLPromptDataModule
from lit_distill.data.squad import SQuADDataModule

COLUMNS = {"arithmetic": {"answer", "id"}, "arithmetic_statements": {"answer", "id"}, "qa": {"answer", "id"},
           "text": {"reference", "id"}}


def write_jsonl(path, rows):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


def batches(dm, split, batch_size=4, num_workers=0):
    return list(DataLoader(dm.datasets[split], batch_size=batch_size, num_workers=num_workers,
                           collate_fn=dm.collate_fn(split)))


def assert_left_padded_round_trip(batch, tokenizer):
    """Real tokens are right-aligned, padding is the pad id, and the real tokens decode to ``prompt``."""
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert ids.shape == mask.shape == (len(batch["prompt"]), ids.shape[1]) and ids.dtype == torch.long
    assert mask[:, -1].eq(1).all()
    for row, prompt in enumerate(batch["prompt"]):
        length = int(mask[row].sum())
        assert mask[row, ids.shape[1] - length:].eq(1).all() and ids[row, :ids.shape[1] - length].eq(
            tokenizer.pad_token_id).all()
        assert tokenizer.decode(ids[row, mask[row].bool()]) == prompt


# ---- corpus.arithmetic_statements ---------------------------------------------------------------------------------

def test_arithmetic_statements_are_document_sums_cut_before_the_result():
    statements = corpus.arithmetic_statements(300, seed=3)
    assert statements == corpus.arithmetic_statements(300, seed=3)
    assert statements[:50] == corpus.arithmetic_statements(50, seed=3)  # more only appends
    verbs = set()
    for statement in statements:
        a, op, b, verb = re.fullmatch(r"(\d+) (plus|minus|times) (\d+) (is|makes)", statement.prompt).groups()
        assert 0 <= int(a) <= 10 and 0 <= int(b) <= 10
        assert statement.answer == str(corpus.OPERATIONS[op](int(a), int(b))) and int(statement.answer) >= 0
        verbs.add(verb)
        # Completed, it is a sentence of the documents' digit style.
        assert any(f"{statement.prompt} {{result}}." == t.format(a=a, op=op, b=b, result="{result}")
                   for t in corpus.ARITHMETIC_TEMPLATES)
    assert verbs == {"is", "makes"}
    assert max(int(s.answer) for s in corpus.arithmetic_statements(300, max_operand=30)) > 100
    with pytest.raises(ValueError, match="max_operand"):
        corpus.arithmetic_statements(3, max_operand=0)


# ---- embedded sources ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(COLUMNS))
def test_embedded_kinds_batch_deterministic_and_disjoint_splits(kind):
    def build(seed=0):
        dm = JSONLPromptDataModule(embedded=kind, num_embedded=40, batch_size=4, seed=seed)
        dm.setup()
        return dm

    dm = build()
    train, validation, test = (dm.datasets[split] for split in ("train", "validation", "test"))
    assert (len(train), len(validation), len(test)) == (40, 4, 4)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "prompt"} | COLUMNS[kind]
    assert all(len(batch[key]) == 4 for key in COLUMNS[kind] | {"prompt"})
    assert_left_padded_round_trip(batch, dm.tokenizer)
    assert_left_padded_round_trip(batches(dm, "validation")[0], dm.tokenizer)

    assert build().datasets == dm.datasets
    assert build(seed=1).datasets["train"] != train
    ids = [{example["id"] for example in split} for split in (train, validation, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    rows = [[(example["prompt"], example.get("reference")) for example in split] for split in (train, validation)]
    assert rows[1] != rows[0][:len(rows[1])]  # another seed, not another slice of the same stream
    if kind in ("qa", "text"):
        assert not set(rows[0]) & set(rows[1])


def test_embedded_rows_hold_what_rewards_check():
    def first(kind, **kwargs):
        dm = JSONLPromptDataModule(embedded=kind, num_embedded=20, **kwargs)
        return dm.build_split("train")

    for example in first("arithmetic", max_operand=5):
        a, op, b = re.search(r"(\d+) (plus|minus|times) (\d+)", example["prompt"]).groups()
        assert example["answer"] == str(corpus.OPERATIONS[op](int(a), int(b))) and max(int(a), int(b)) <= 5
    for example in first("arithmetic_statements"):
        a, op, b, _ = example["prompt"].split()
        assert example["answer"] == str(corpus.OPERATIONS[op](int(a), int(b)))
    documents = corpus.text_documents(20, seed=0)
    for example, document in zip(first("text"), documents):
        assert example["prompt"] + example["reference"] == document
        assert example["prompt"].endswith(".") and example["reference"].startswith(" ")
        assert example["prompt"].count(".") == 1 and example["reference"].count(".") >= 2
    qa = first("qa")[0]
    assert qa["prompt"].startswith("Context: ") and qa["prompt"].endswith("\nAnswer:") and qa["answer"] in qa["prompt"]


@pytest.mark.parametrize("chat_template, system", [("none", None), ("default", "Answer in one word.")])
def test_qa_prompts_are_those_of_squad_sft(chat_template, system):
    prompts = JSONLPromptDataModule(embedded="qa", num_embedded=30, chat_template=chat_template, system_prompt=system)
    squad = SQuADDataModule(embedded_examples=30, chat_template=chat_template, system=system)
    for split in ("train", "validation"):
        ours, theirs = prompts.build_split(split), squad.examples(split)
        assert [e["prompt"] for e in ours] == [squad.prompt(example) for example in theirs]
        assert [(e["id"], e["answer"]) for e in ours] == [(example.id, example.answers[0]) for example in theirs]
        assert [e["prompt_ids"] for e in ours] == [e["prompt_ids"] for e in squad.build_split(split)]


def test_chat_template_applies_to_prompt_rows_only():
    question = JSONLPromptDataModule(embedded="arithmetic", num_embedded=5, chat_template="default",
                                     system_prompt="Be brief.").build_split("train")[0]
    user = re.fullmatch(r"Be brief\.\n<\|user\|>\n(.*)\n<\|assistant\|>\n", question["prompt"]).group(1)
    assert user == corpus.arithmetic_problems(5, max_operand=10)[0].prompt
    statement = JSONLPromptDataModule(embedded="arithmetic_statements", num_embedded=5,
                                      chat_template="default").build_split("train")[0]
    assert statement["prompt"] == corpus.arithmetic_statements(5)[0].prompt


# ---- JSONL files --------------------------------------------------------------------------------------------------

ROWS = [{"prompt": "Where does Mara live?", "answer": "Ashford", "meta": {"level": 1}},
        {"text": "7 plus 5 is", "answer": "12", "meta": None},
        {"prompt": "How old is Tomas, who lives in Brightwater?", "answer": 42, "meta": [1, 2]},
        {"prompt": "What is 3 plus 4?", "answer": "7", "meta": {}}]


def test_single_file_is_held_out_and_carries_any_json_columns(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", ROWS[:2] + [""] + ROWS[2:])
    dm = JSONLPromptDataModule(path=path, validation_fraction=0.25, batch_size=3, seed=7)
    dm.setup()
    assert dm.datasets["test"] == []
    (validation,) = batches(dm, "validation")
    assert validation["prompt"] == ["Where does Mara live?"] and validation["meta"] == [{"level": 1}]
    (train,) = batches(dm, "train", batch_size=3)
    assert train["prompt"] == ["7 plus 5 is", "How old is Tomas, who lives in Brightwater?", "What is 3 plus 4?"]
    assert train["answer"] == ["12", 42, "7"] and train["meta"] == [None, [1, 2], {}]
    assert_left_padded_round_trip(train, dm.tokenizer)
    # The holdout does not depend on the seed: runs with different seeds validate on the same prompts.
    other = JSONLPromptDataModule(path=path, validation_fraction=0.25, seed=8)
    assert other.build_split("validation") == dm.datasets["validation"]
    capped = JSONLPromptDataModule(path=path, validation_fraction=0.25, max_examples={"train": 2})
    assert len(capped.build_split("train")) == 2


def test_directory_source_and_chat_template_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "validation.jsonl", ROWS[1:3])
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    dm = JSONLPromptDataModule(path=str(tmp_path), chat_template=str(template), system_prompt="Be brief.")
    dm.setup()
    assert [e["prompt"] for e in dm.datasets["validation"]] == [
        "7 plus 5 is", "system: Be brief.\nuser: How old is Tomas, who lives in Brightwater?\nassistant:"]
    assert len(dm.datasets["train"]) == 4 and dm.datasets["test"] == []
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert len(JSONLPromptDataModule(path=str(tmp_path)).build_split("test")) == 1
    (tmp_path / "validation.jsonl").rename(tmp_path / "validation.txt")
    with pytest.raises(DataFileError, match=r"validation\.txt: prompt files are JSON lines"):
        JSONLPromptDataModule(path=str(tmp_path)).build_split("validation")
    (tmp_path / "validation.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no validation.jsonl"):
        JSONLPromptDataModule(path=str(tmp_path)).setup("validate")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Hi", "answer": ', r"malformed JSON"),
    ('["Hi"]', r"expected a JSON object, got list"),
    ({"prompt": "Hi", "text": "Hi", "answer": "x"},
     r"expected exactly one of 'text' .* or 'prompt'.*\['answer', 'prompt', 'text'\]"),
    ({"question": "Hi", "answer": "x"}, r"expected exactly one of 'text'.*\['answer', 'question'\]"),
    ({"prompt": ["Hi"], "answer": "x"}, r"field 'prompt' must be a non-empty string, got \['Hi'\]"),
    ({"text": "", "answer": "x"}, r"field 'text' must be a non-empty string, got ''"),
    ({"prompt": "Hi"}, r"missing column\(s\) \['answer'\]; every line needs the columns of line 1, \['answer'\]"),
    ({"prompt": "Hi", "answer": "x", "id": 3}, r"column\(s\) \['id'\] not on line 1"),
    ({"prompt": "Hi", "answer": "x", "prompt_input_ids": [1]}, r"column name\(s\) \['prompt_input_ids'\] are reserved"),
])
def test_each_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Where?", "answer": "Ashford"}, "", line])
    with pytest.raises(DataFileError, match=rf"prompts\.jsonl:3: {message}"):
        JSONLPromptDataModule(path=path).setup("fit")


def test_constructor_rejects_ambiguous_or_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="exactly one of path"):
        JSONLPromptDataModule()
    with pytest.raises(ValueError, match="exactly one of path"):
        JSONLPromptDataModule(path=str(tmp_path), embedded="qa")
    with pytest.raises(ValueError, match="embedded must be one of"):
        JSONLPromptDataModule(embedded="gsm8k")
    with pytest.raises(ValueError, match="truncation"):
        JSONLPromptDataModule(embedded="qa", truncation="right")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        JSONLPromptDataModule(path=str(tmp_path / "missing.jsonl")).setup("fit")


# ---- truncation, workers, CLI -------------------------------------------------------------------------------------

def test_long_prompts_keep_their_end_and_are_counted_once_or_raise(tmp_path, caplog, tokenizer):
    long = {"prompt": "Mara lives in Ashford. " * 20 + "Where does Mara live?", "answer": "Ashford"}
    short = [{"prompt": "Where does Mara live?", "answer": "Ashford"}, {"prompt": "What is 3 plus 4?", "answer": "7"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", [short[0], long, "", long, short[1]])
    dm = JSONLPromptDataModule(path=path, validation_fraction=0.0, max_prompt_length=12, chat_template="default")
    with caplog.at_level(logging.WARNING, logger="lit_distill.data.prompts"):
        train = dm.build_split("train")
    full = tokenize(tokenizer, f"<|user|>\n{long['prompt']}\n<|assistant|>\n")
    assert len(full) > 12
    assert train[1]["prompt_ids"] == full[-12:]  # the end: the question and the assistant header
    assert train[1]["prompt"] == tokenizer.decode(full[-12:])
    assert train[1]["prompt"].endswith("live?\n<|assistant|>\n")
    assert train[0]["prompt"] == "<|user|>\nWhere does Mara live?\n<|assistant|>\n"  # short ones untouched
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4 examples of the train split" in warnings[0]
    assert "prompts.jsonl:2, " in warnings[0] and "prompts.jsonl:4" in warnings[0]  # file lines, blank counted
    with pytest.raises(ValueError, match=r"prompts\.jsonl:2: the prompt has \d+ tokens, more than "
                                         r"max_prompt_length=12 \(truncation='error'\)"):
        JSONLPromptDataModule(path=path, validation_fraction=0.0, max_prompt_length=12, chat_template="default",
                              truncation="error").build_split("train")


def test_worker_processes_give_the_same_batches(tmp_path):
    dm = JSONLPromptDataModule(path=write_jsonl(tmp_path / "prompts.jsonl", ROWS), validation_fraction=0.5)
    dm.setup("fit")
    in_process, in_worker = batches(dm, "train", batch_size=2), batches(dm, "train", batch_size=2, num_workers=1)
    assert len(in_worker) == 1
    for key, value in in_process[0].items():
        assert torch.equal(value, in_worker[0][key]) if torch.is_tensor(value) else value == in_worker[0][key]


def test_parses_from_yaml_through_the_cli(tmp_path, capsys):
    config = tmp_path / "rl.yaml"
    config.write_text("model:\n  class_path: lit_distill.modules.SFTModule\n  init_args:\n    model:\n"
                      "      name_or_path: lit-distill/tiny-teacher\n"
                      "data:\n  class_path: lit_distill.data.JSONLPromptDataModule\n  init_args:\n"
                      "    embedded: arithmetic_statements\n    max_examples: {validation: 16}\n"
                      "    max_prompt_length: 32\n")
    with pytest.raises(SystemExit) as exit_info:
        LitDistillCLI(args=["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lit_distill.data.JSONLPromptDataModule" in printed
    assert "embedded: arithmetic_statements" in printed and "truncation: left_prompt" in printed
