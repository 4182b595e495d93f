"""Exact resume: a run resumed from a mid-epoch checkpoint trains on the same batches and computes the same losses
as the uninterrupted run — in process, and after the run was killed with SIGKILL."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_distill.callbacks import Autocurriculum
from lit_distill.data import (CurriculumDataModule, DialogDataModule, JSONLPromptDataModule, QuestionDataModule,
                              SQuADDataModule, SQuADPreferenceDataModule, WikiTextDataModule)
from lit_distill.data.curriculum import CurriculumSampler
from lit_distill.models.loading import ModelSpec
from lit_distill.modules import AgentModule, DistillModule, DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule
from lit_distill.rewards import ArithmeticReward
from lit_distill.rollout import Sampling
from lit_distill.teachers import LocalTeacher

ROOT = Path(__file__).resolve().parent.parent
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


class Losses(Callback):
    """Every training step's loss (the value back-propagated, for modules that return one), by global step."""

    def __init__(self):
        self.values = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs:  # manual optimisation (RL) returns nothing
            self.values[trainer.global_step] = float(outputs["loss"])


def run(module_factory, data_factory, directory: Path, max_steps: int, ckpt_path=None, callbacks=()):
    """Fit to ``max_steps`` with a checkpoint every 3 steps: (losses by step, the trained weights, the data)."""
    L.seed_everything(0)
    module, data = module_factory(), data_factory()
    losses = Losses()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[losses, *callbacks, ModelCheckpoint(directory, every_n_train_steps=3,
                                                                       save_top_k=-1)])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return losses.values, {name: value.clone() for name, value in module.model.state_dict().items()}, data


def student():
    return ModelSpec(tokenizer="lit-distill/tiny-teacher", config=TINY)


# Each epoch has 9 or 10 batches of 4: a checkpoint at step 3 is mid-epoch, and step 14 is in the second epoch.
CASES = {
    "sft-squad": (lambda: SFTModule(student()),
                  lambda: SQuADDataModule(embedded_examples=40, max_length=96, batch_size=4,
                                          max_examples={"validation": 4})),
    "sft-wikitext": (lambda: SFTModule(student()),
                     lambda: WikiTextDataModule(source="embedded", embedded_documents=30, block_size=32, batch_size=4,
                                                max_blocks={"validation": 4})),
    "kd-on-policy": (lambda: DistillModule(student(), ModelSpec("lit-distill/tiny-teacher"), on_policy_fraction=0.5,
                                           prompt_tokens=8, sampling=Sampling(max_new_tokens=8)),
                     lambda: WikiTextDataModule(source="embedded", tokenizer="lit-distill/tiny-teacher",
                                                embedded_documents=30, block_size=32, batch_size=4,
                                                max_blocks={"validation": 4})),
    "dpo": (lambda: DPOModule(student()),
            lambda: SQuADPreferenceDataModule(embedded_examples=40, max_length=96, batch_size=4,
                                              max_examples={"validation": 4})),
    "grpo": (lambda: GRPOModule(ModelSpec("lit-distill/tiny-teacher"), [ArithmeticReward()], num_generations=2,
                                sampling=Sampling(max_new_tokens=4)),
             lambda: JSONLPromptDataModule(embedded="arithmetic_statements", num_embedded=40, batch_size=4,
                                           max_examples={"validation": 4})),
    "ppo": (lambda: PPOModule(ModelSpec("lit-distill/tiny-teacher"), [ArithmeticReward()],
                              sampling=Sampling(max_new_tokens=4), ppo_epochs=1),
            lambda: JSONLPromptDataModule(embedded="arithmetic_statements", num_embedded=40, batch_size=4,
                                          max_examples={"validation": 4})),
    "reward": (lambda: RewardModule(student()),
               lambda: SQuADPreferenceDataModule(embedded_examples=40, max_length=96, batch_size=4,
                                                 max_examples={"validation": 4})),
    "agent": (lambda: AgentModule(ModelSpec(tokenizer="lit-distill/tiny-teacher", config=TINY),
                                  LocalTeacher(ModelSpec("lit-distill/tiny-teacher"), max_new_tokens=4,
                                               chat_template="none", stop_strings=["."]),
                                  sampling=Sampling(max_new_tokens=4)),
              lambda: QuestionDataModule(embedded="arithmetic_statements", tokenizer="lit-distill/tiny-teacher",
                                         num_embedded=40, batch_size=4, max_examples={"validation": 4})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_from_a_mid_epoch_checkpoint_repeats_every_later_step(tmp_path, case):
    module_factory, data_factory = CASES[case]
    losses, weights, _ = run(module_factory, data_factory, tmp_path / "first", max_steps=14)
    checkpoint = next((tmp_path / "first").glob("*step=3.ckpt"))
    resumed_losses, resumed_weights, _ = run(module_factory, data_factory, tmp_path / "second", max_steps=14,
                                             ckpt_path=str(checkpoint))
    assert resumed_losses == {step: losses[step] for step in resumed_losses}
    assert all(torch.equal(resumed_weights[name], weights[name]) for name in weights)  # bit-identical training


@pytest.mark.parametrize("num_workers", [0, 2])
def test_curriculum_resumes_mid_epoch_with_the_weights_each_batch_was_drawn_with(tmp_path, num_workers):
    """Weights move every 2 steps. With DataLoader workers the sampler draws batches ahead of training, before the
    updates that precede the checkpoint: the resumed run must draw those with the weights recorded for them."""
    def curriculum():
        return CurriculumDataModule(
            {"dialog": DialogDataModule(source="embedded", embedded_documents=30, block_size=32),
             "text": WikiTextDataModule(source="embedded", embedded_documents=30, block_size=32)},
            batch_size=4, batches_per_epoch=10, difficulty_sample_size=8, lr=1.0, num_workers=num_workers)

    def sft():
        return SFTModule(ModelSpec(tokenizer="lit-distill/tokenizer", config=TINY))

    losses, weights, data = run(sft, curriculum, tmp_path / "first", 14, callbacks=[Autocurriculum(2, 4)])
    resumed_losses, resumed_weights, resumed_data = run(
        sft, curriculum, tmp_path / "second", 14, ckpt_path=str(next((tmp_path / "first").glob("*step=3.ckpt"))),
        callbacks=[Autocurriculum(2, 4)])
    assert resumed_losses == {step: losses[step] for step in resumed_losses}
    assert all(torch.equal(resumed_weights[name], weights[name]) for name in weights)
    assert torch.equal(resumed_data.weights, data.weights) and torch.equal(resumed_data.samples_drawn,
                                                                           data.samples_drawn)


def test_curriculum_sampler_redraws_batches_drawn_ahead_with_the_weights_they_were_drawn_with():
    weights, drawn, done = torch.tensor([1.0, 0.0]), torch.zeros(2), [0]
    sampler = CurriculumSampler([40, 40], weights, drawn, batch_size=4, num_batches=10, batches_done=lambda: done[0])
    draws = iter(sampler)
    keys = [next(draws) for _ in range(5)]  # workers drew 5 batches ahead while training processed 3
    done[0] = 3
    state = sampler.state_at(3)
    weights.copy_(torch.tensor([0.0, 1.0]))  # an update after those draws, before the checkpoint
    keys += list(draws)
    resumed = CurriculumSampler([40, 40], weights.clone(), torch.zeros(2), batch_size=4, num_batches=10,
                                batches_done=lambda: 3)
    resumed.load_state(state)
    assert list(resumed) == keys[3:] and [d for d, _ in keys] == [0] * 5 + [1] * 5
    assert torch.equal(resumed.samples_drawn, drawn)


OVERLAY = """
trainer:
  max_steps: 30                  # an epoch is 25 batches: the resumed run crosses an epoch boundary
  val_check_interval: 15
  log_every_n_steps: 1
  enable_checkpointing: true
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {checkpoints}, every_n_train_steps: 5, save_top_k: -1, save_on_exception: true}}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {logs}, name: {name}}}
model:
  init_args:
    model:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
               num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}}
    save_dir: {logs}/{name}/model
data:
  init_args: {{embedded_examples: 200, batch_size: 8, max_examples: {{validation: 16}}}}
"""


def launch(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    overlay = tmp_path / f"{name}.yaml"
    overlay.write_text(OVERLAY.format(checkpoints=tmp_path / name / "checkpoints", logs=tmp_path, name=name))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lit_distill", "fit", "--config", "configs/sft/quickstart.yaml",
                             "--config", str(overlay), *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def logged(tmp_path: Path, name: str) -> dict[tuple[str, int], str]:
    rows = csv.DictReader(next((tmp_path / name).rglob("metrics.csv")).open())
    return {(key, int(row["step"])): value for row in rows for key, value in row.items()
            if value and key not in ("step", "epoch") and not key.startswith("perf/")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The metrics of the run the stopped ones are compared with."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    process = launch(directory, "uninterrupted")
    assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    return logged(directory, "uninterrupted")


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_run_stopped_after_a_mid_epoch_checkpoint_resumes_to_the_same_losses_and_metrics(tmp_path, stop,
                                                                                            uninterrupted):
    """SIGKILL: resume from the last periodic checkpoint. SIGTERM (a scheduler's preemption): the run saves a
    checkpoint where it stopped (save_on_exception), exits 143, and resumes from there."""
    stopped = launch(tmp_path, "stopped")
    checkpoints = tmp_path / "stopped" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "epoch=0-step=10.ckpt").exists() and stopped.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped.send_signal(stop)
    returncode = stopped.wait(timeout=60)
    assert returncode == (-signal.SIGKILL if stop == signal.SIGKILL else 143), stopped.stderr.read()[-3000:]
    checkpoint = max(checkpoints.glob("*.ckpt"), key=lambda path: int(path.stem.split("step=")[1]))
    step = int(checkpoint.stem.split("step=")[1])
    assert 10 <= step < 30
    # Its own save_dir and log folder: a difference from the checkpoint's run that the config is told to win.
    resumed = launch(tmp_path, "resumed", "--ckpt_path", str(checkpoint), "--resume_config", "config")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    found = logged(tmp_path, "resumed")
    later = {key: value for key, value in uninterrupted.items() if key[1] >= step}
    assert {key for key in later if key[0] == "train/loss"} == {("train/loss", index) for index in range(step, 30)}
    assert ("val/loss", 29) in later
    assert found == later  # every later loss and metric, to the last digit


DDP_OVERLAY = """
trainer:
  devices: 2
  strategy: ddp
  enable_progress_bar: false
  max_steps: 14
  val_check_interval: 7
  log_every_n_steps: 1
  enable_checkpointing: true
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {logs}, name: {name}}}
model:
  init_args:
    model:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 512}}
    save_dir: {logs}/{name}/model
"""

# The quickstart's SQuAD rows (a sampler over a map-style dataset), or the example text file streamed (positions
# gathered from both ranks into the checkpoint).
DDP_DATA = {
    "squad": "data:\n  init_args: {{embedded_examples: 200, batch_size: 4, max_examples: {{validation: 8}}}}\n",
    "streamed": "data:\n  class_path: lit_distill.data.HFDataModule\n  init_args: {{path: {logs}/text.jsonl, "
                "streaming: true, shuffle_buffer: 32, max_length: 64, batch_size: 4, max_examples: {{validation: 8}}, "
                "cache_dir: {logs}/cache}}\n",
}


@pytest.mark.slow  # three 2-process runs each: ~90 s on 2 cores
@pytest.mark.parametrize("data", DDP_DATA)
def test_two_process_ddp_resumes_from_a_mid_epoch_checkpoint_to_the_same_weights(tmp_path, data):
    from transformers import AutoModelForCausalLM

    from lit_distill.data.examples import write_examples

    write_examples(tmp_path, rows=200)

    def fit(name: str, *extra: str) -> None:
        overlay = tmp_path / f"{name}.yaml"
        overlay.write_text((DDP_OVERLAY + DDP_DATA[data]).format(logs=tmp_path, name=name))
        result = subprocess.run([sys.executable, "-m", "lit_distill", "fit", "--config", "configs/sft/quickstart.yaml",
                                 "--config", str(overlay), *extra], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    checkpoints = tmp_path / "checkpoints.yaml"
    checkpoints.write_text(f"trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                           f"      init_args: {{dirpath: {tmp_path / 'ckpt'}, every_n_train_steps: 5, "
                           f"save_top_k: -1}}\n")
    fit("uninterrupted", "--config", str(checkpoints))
    fit("resumed", "--ckpt_path", str(tmp_path / "ckpt" / "epoch=0-step=5.ckpt"), "--resume_config", "config")
    expected, found = logged(tmp_path, "uninterrupted"), logged(tmp_path, "resumed")
    assert found and found == {key: value for key, value in expected.items() if key[1] >= 5}
    weights = [AutoModelForCausalLM.from_pretrained(tmp_path / name / "model").state_dict()
               for name in ("uninterrupted", "resumed")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
