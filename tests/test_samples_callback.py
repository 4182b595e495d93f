"""PromptSamples: the rows it writes are the trained model's own greedy completions at the right steps, in JSONL,
CSV, TensorBoard text and a wandb table; prompts files, formatting and seeded sampling."""

import copy
import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TOKENIZER, greedy_reference
from lit_distill.callbacks import PromptSamples
from lit_distill.data import WikiTextDataModule
from lit_distill.data.chat import format_prompt
from lit_distill.data.io import DataFileError
from lit_distill.models.loading import ModelSpec, eos_token_ids
from lit_distill.modules import SFTModule
from lit_distill.rollout import left_pad

PROMPTS = ["Anna lives in", "The river | runs", "Hello"]
STUDENT = ModelSpec(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 4}, tokenizer=TOKENIZER)
MAX_NEW_TOKENS = 8


def make_sft():
    torch.manual_seed(0)
    return SFTModule(model=STUDENT, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))


def fit(module, callback, **trainer_kwargs):
    settings = dict(accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0)
    trainer = L.Trainer(**settings, **trainer_kwargs, callbacks=[callback])
    trainer.fit(module, datamodule=WikiTextDataModule(source="embedded", embedded_documents=20, block_size=32,
                                                      batch_size=4))
    return trainer


def reference_completions(model, tokenizer, prompts):
    """Greedy completions by a full forward per token (no KV cache), cut after the first end token and decoded."""
    input_ids, attention_mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
                                         tokenizer.pad_token_id)  # (B, P)
    tokens = greedy_reference(model.eval(), input_ids, attention_mask, MAX_NEW_TOKENS)  # (B, MAX_NEW_TOKENS)
    ends = eos_token_ids(model, tokenizer)
    texts = []
    for row in tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in ends), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def read_rows(log_dir):
    jsonl = [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]
    with (log_dir / "samples.csv").open(newline="") as handle:
        rows = [{**row, "step": int(row["step"])} for row in csv.DictReader(handle)]
    assert rows == jsonl
    return jsonl


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread):
    """5 steps of SFT with TensorBoard and offline wandb, sampling at steps 0, 2, 4 and 5 (the end)."""
    import wandb

    tmp_path = tmp_path_factory.mktemp("samples")
    module = make_sft()
    initial_model = copy.deepcopy(module.model)
    loggers = [TensorBoardLogger(tmp_path), WandbLogger(save_dir=tmp_path, offline=True)]
    trainer = fit(module, PromptSamples(prompts=PROMPTS, every_n_steps=2, max_new_tokens=MAX_NEW_TOKENS),
                  max_steps=5, logger=loggers)
    wandb.finish()  # the logger leaves its run open; later tests must start their own
    return module, initial_model, trainer, tmp_path


def test_rows_are_the_models_greedy_completions_before_during_and_after(run):
    module, initial_model, trainer, _ = run
    rows = read_rows(Path(trainer.log_dir))
    assert [row["step"] for row in rows] == [step for step in (0, 2, 4, 5) for _ in PROMPTS]
    assert [row["prompt"] for row in rows] == PROMPTS * 4
    before = [row["completion"] for row in rows[:3]]
    after = [row["completion"] for row in rows[-3:]]
    assert before == reference_completions(initial_model, module.tokenizer, PROMPTS)
    assert after == reference_completions(module.model, module.tokenizer, PROMPTS)
    assert before != after  # training changed the answers: the comparison above is not between equal models


def test_tensorboard_text_holds_each_steps_table(run):
    _, _, trainer, _ = run
    accumulator = EventAccumulator(trainer.log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    events = accumulator.Tensors("samples/text_summary")
    assert [event.step for event in events] == [0, 2, 4, 5]
    rows = read_rows(Path(trainer.log_dir))
    for event in events:
        text = event.tensor_proto.string_val[0].decode()
        assert text.startswith("| prompt | completion |")
        step_rows = [row for row in rows if row["step"] == event.step]
        assert len(text.splitlines()) == 2 + len(step_rows)
        assert "| The river \\| runs |" in text  # a pipe in a cell does not split the row
        for row in step_rows:
            assert row["completion"].replace("|", "\\|").replace("\n", "<br>") in text


def test_wandb_table_holds_all_rows_so_far(run):
    _, _, trainer, tmp_path = run
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    tables = sorted((run_dir / "files" / "media" / "table").glob("samples_*.table.json"),
                    key=lambda path: int(path.name.split("_")[1]))
    assert len(tables) == 4
    latest = json.loads(tables[-1].read_text())
    assert latest["columns"] == ["step", "prompt", "completion"]
    rows = read_rows(Path(trainer.log_dir))
    assert latest["data"] == [[row["step"], row["prompt"], row["completion"]] for row in rows]


def test_without_logger_with_accumulation_each_step_is_sampled_once(tmp_path, one_torch_thread):
    callback = PromptSamples(prompts=PROMPTS[:1], every_n_steps=1, max_new_tokens=2, key="answers")
    fit(make_sft(), callback, max_steps=3, accumulate_grad_batches=2, logger=False, default_root_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert (tmp_path / "answers.csv").read_text().count("\n") == 1 + 4


def test_prompts_file_reading_and_errors(tmp_path):
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first\n\n  \nsecond\n")
    jsonl_file = tmp_path / "prompts.jsonl"
    jsonl_file.write_text('{"prompt": "first", "id": 1}\n\n{"prompt": "second"}\n')
    for file in (text_file, jsonl_file):
        assert PromptSamples(prompts=["zero"], prompts_file=str(file)).prompts == ["zero", "first", "second"]

    cases = {'{"prompt": "ok"}\n{"prompt": "cut\n': r"bad\.jsonl:2: malformed JSON",
             '{"prompt": "ok"}\n\n{"text": "no prompt"}\n': r"bad\.jsonl:3: missing field\(s\) \['prompt'\]",
             '{"prompt": 7}\n': r"bad\.jsonl:1: field 'prompt' must be a string"}
    bad = tmp_path / "bad.jsonl"
    for content, message in cases.items():
        bad.write_text(content)
        with pytest.raises(DataFileError, match=message):
            PromptSamples(prompts_file=str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataFileError, match="empty.txt: holds no prompts"):
        PromptSamples(prompts_file=str(empty))
    with pytest.raises(DataFileError, match="unsupported prompts file type '.csv'"):
        PromptSamples(prompts_file=str(tmp_path / "prompts.csv"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PromptSamples(prompts_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="needs prompts"):
        PromptSamples()


class ChatData(L.LightningDataModule):
    def __init__(self, chat_template: str = "default", system_prompt: str = "Answer briefly."):
        super().__init__()
        self.save_hyperparameters()


def test_prompts_are_formatted_like_the_datamodules(tokenizer):
    follows = PromptSamples(prompts=PROMPTS).formatted_prompts(tokenizer, ChatData())
    assert follows == [format_prompt(tokenizer, p, "default", "Answer briefly.") for p in PROMPTS]
    assert follows[0] != PROMPTS[0]
    assert PromptSamples(prompts=PROMPTS).formatted_prompts(tokenizer, WikiTextDataModule()) == PROMPTS
    assert PromptSamples(prompts=PROMPTS).formatted_prompts(tokenizer, None) == PROMPTS
    assert PromptSamples(prompts=PROMPTS, chat_template="none").formatted_prompts(tokenizer, ChatData()) == PROMPTS


def test_sampling_is_seeded_by_step(run):
    module = run[0]
    sampler = PromptSamples(prompts=PROMPTS, temperature=1.5, max_new_tokens=MAX_NEW_TOKENS, seed=1)
    first = sampler.completions(module, PROMPTS, step=3)
    assert sampler.completions(module, PROMPTS, step=3) == first
    assert sampler.completions(module, PROMPTS, step=4) != first
    greedy = PromptSamples(prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS).completions(module, PROMPTS, step=3)
    assert greedy != first


def test_rl_module_with_several_optimizer_steps_per_batch(llama_dir, tokenizer, tmp_path, one_torch_thread):
    from lit_distill.rollout import Sampling
    from tests.test_rl_modules import ppo, prompt_batches

    # 3 optimizer steps per batch: steps 3, 6
    module = ppo(llama_dir, ppo_epochs=3, sampling=Sampling(max_new_tokens=2))
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path,
                        callbacks=[PromptSamples(prompts=PROMPTS, every_n_steps=4, max_new_tokens=MAX_NEW_TOKENS)])
    trainer.fit(module, torch.utils.data.DataLoader(prompt_batches(tokenizer), batch_size=None))
    assert trainer.global_step == 6
    rows = read_rows(tmp_path)
    # Step 4 is never a global step here: the sample is taken at 6, the first step past it, and not again at the end.
    assert [row["step"] for row in rows] == [0] * len(PROMPTS) + [6] * len(PROMPTS)
    assert [row["completion"] for row in rows[-3:]] == reference_completions(module.model, tokenizer, PROMPTS)


def test_ddp_two_processes_log_once_without_deadlock(llama_dir, tmp_path):
    from tests.test_cli import ROOT, run_cli

    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lit_distill.callbacks.PromptSamples",
        "init_args": {"prompts": PROMPTS, "every_n_steps": 2, "max_new_tokens": 4, "temperature": 1.0}}]}}))
    run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(callbacks),
             "--model.init_args.teacher.name_or_path", llama_dir, "--model.init_args.student.tokenizer", llama_dir,
             "--data.init_args.tokenizer", llama_dir, "--data.init_args.embedded_documents", "100",
             "--data.init_args.block_size", "32", "--data.init_args.batch_size", "2", "--trainer.max_steps", "3",
             "--trainer.limit_val_batches", "0", "--trainer.logger.init_args.save_dir", str(tmp_path),
             "--trainer.enable_progress_bar", "false", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
            cwd=tmp_path)
    (log_dir,) = {path.parent for path in tmp_path.rglob("samples.jsonl")}
    assert [row["step"] for row in read_rows(log_dir)] == [step for step in (0, 2, 3) for _ in PROMPTS]
