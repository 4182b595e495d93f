"""The autocurriculum: the weight update rule on hand-computed cases, the sampler's draws, the DataModule and
callback through the CLI with every algorithm family, exact resume, and 2-process DDP agreement."""

import csv
import json
import textwrap

import pytest
import torch

from lit_distill.callbacks.curriculum import example_losses
from lit_distill.cli import LitDistillCLI
from lit_distill.models.loading import load_tokenizer
from lit_distill.data.curriculum import (CurriculumSampler, CurriculumState, SequentialMixtureSampler, apply_floor,
                                         curriculum_update)
from test_cli import ROOT, run_cli

# ---- the update rule -----------------------------------------------------------------------------------------


def state(weights, velocity=None):
    weights = torch.tensor(weights, dtype=torch.float64)
    return CurriculumState(weights, torch.zeros_like(weights) if velocity is None else
                           torch.tensor(velocity, dtype=torch.float64))


def test_update_moves_weight_towards_the_hardest_dataset_by_hand():
    # s = μ + 0.5 σ² = [1.5, 3.0, 1.5]; g = s − 2 = [−0.5, 1, −0.5]; v = 0.1 g; w = 1/3 + v (no clipping).
    new = curriculum_update(state([1 / 3] * 3), torch.tensor([1.0, 2.0, 1.5], dtype=torch.float64),
                            torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), lr=0.1, momentum=0.9,
                            variance_weight=0.5, min_weight=0.0)
    torch.testing.assert_close(new.velocity, torch.tensor([-0.05, 0.1, -0.05], dtype=torch.float64))
    torch.testing.assert_close(new.weights, torch.tensor([1 / 3 - 0.05, 1 / 3 + 0.1, 1 / 3 - 0.05],
                                                         dtype=torch.float64))


def test_momentum_carries_velocity_between_updates_by_hand():
    # Equal scores: g = 0, so the step is the decayed velocity alone: v = 0.5 · [0.1, −0.1], w = [0.6, 0.4].
    new = curriculum_update(state([0.55, 0.45], [0.1, -0.1]), torch.tensor([2.0, 2.0]).double(),
                            torch.zeros(2).double(), lr=1.0, momentum=0.5, min_weight=0.0)
    torch.testing.assert_close(new.velocity, torch.tensor([0.05, -0.05], dtype=torch.float64))
    torch.testing.assert_close(new.weights, torch.tensor([0.6, 0.4], dtype=torch.float64))


def test_clip_at_zero_renormalise_and_floor_by_hand():
    # Scores [2, 0, 1]: g = [1, −1, 0]; v = 0.5 g; w + v = [0.8, −0.3, 0.5] → clip [0.8, 0, 0.5] → / 1.3.
    # Floor 0.1: entry 1 rises to 0.1, the other two share 0.9 in proportion 0.8 : 0.5.
    new = curriculum_update(state([0.3, 0.2, 0.5]), torch.tensor([2.0, 0.0, 1.0]).double(),
                            torch.zeros(3).double(), lr=0.5, momentum=0.0, min_weight=0.1)
    torch.testing.assert_close(new.weights, torch.tensor([0.9 * 0.8 / 1.3, 0.1, 0.9 * 0.5 / 1.3],
                                                         dtype=torch.float64))
    # The floored dataset's outward velocity is dropped; the others keep theirs.
    torch.testing.assert_close(new.velocity, torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))


def test_floor_cascades_and_is_a_no_op_on_valid_weights():
    # 0.02 and 0.08 both end at the floor 0.1: raising the first pushes the second below it.
    floored = apply_floor(torch.tensor([0.9, 0.08, 0.02], dtype=torch.float64), 0.1)
    torch.testing.assert_close(floored, torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64))
    valid = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert torch.equal(apply_floor(valid, 0.1), valid)


def test_update_keeps_a_distribution_and_no_dataset_starves():
    generator = torch.Generator().manual_seed(0)
    current = state([0.25] * 4)
    for _ in range(200):
        difficulty = torch.rand(4, generator=generator, dtype=torch.float64) * 5
        current = curriculum_update(current, difficulty, torch.rand(4, generator=generator, dtype=torch.float64),
                                    lr=0.5, momentum=0.9, min_weight=0.05)
        assert abs(current.weights.sum().item() - 1) < 1e-12
        assert current.weights.min().item() >= 0.05 - 1e-12


def test_update_rejects_an_impossible_floor():
    with pytest.raises(ValueError, match=r"min_weight must be in \[0, 1/3\]"):
        curriculum_update(state([1 / 3] * 3), torch.ones(3).double(), torch.ones(3).double(), lr=0.1, min_weight=0.4)


# ---- the samplers --------------------------------------------------------------------------------------------

def test_sampler_draws_datasets_according_to_the_weights():
    weights = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    drawn = torch.zeros(3, dtype=torch.float64)
    sampler = CurriculumSampler([50, 40, 30], weights, drawn, batch_size=4, num_batches=6000, seed=3)
    counts = torch.bincount(torch.tensor([d for d, _ in sampler]), minlength=3).double()
    expected = weights * 6000
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 13.82  # the 0.999 quantile of chi-square with 2 degrees of freedom
    torch.testing.assert_close(drawn, counts * 4)


def test_sampler_reads_updated_weights_mid_epoch():
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    sampler = CurriculumSampler([20, 20], weights, torch.zeros(2, dtype=torch.float64), batch_size=2,
                                num_batches=400)
    draws = []
    for step, (dataset, _) in enumerate(sampler):
        draws.append(dataset)
        if step == 199:
            weights.copy_(torch.tensor([0.0, 1.0]))
    assert 0 < sum(draws[:200]) < 200 and all(d == 1 for d in draws[200:])


def test_sampler_ranks_share_the_dataset_sequence_and_split_the_examples():
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ranks = [list(CurriculumSampler([13, 9, 30], weights, torch.zeros(3, dtype=torch.float64), batch_size=2,
                                    num_batches=60, num_replicas=2, rank=rank, seed=1)) for rank in (0, 1)]
    assert [d for d, _ in ranks[0]] == [d for d, _ in ranks[1]]
    for (dataset, first), (_, second) in zip(*ranks):
        assert len(first) == len(second) == 2 and not set(first) & set(second)
        assert max(first + second) < [13, 9, 30][dataset]
    # An epoch is a function of (seed, epoch, weights): the same again, different for the next epoch.
    again = CurriculumSampler([13, 9, 30], weights, torch.zeros(3, dtype=torch.float64), batch_size=2,
                              num_batches=60, num_replicas=2, rank=0, seed=1)
    assert list(again) == ranks[0]
    again.set_epoch(1)
    assert list(again) != ranks[0]


def test_sampler_walks_each_dataset_without_repeats_within_a_cycle():
    sampler = CurriculumSampler([12], torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                batch_size=4, num_batches=6)
    batches = [indices for _, indices in sampler]
    assert sorted(sum(batches[:3], [])) == list(range(12)) and sorted(sum(batches[3:], [])) == list(range(12))


def test_evaluation_sampler_covers_every_example_once_across_ranks():
    keys = [key for rank in (0, 1) for key in SequentialMixtureSampler([5, 3], batch_size=2, num_replicas=2,
                                                                       rank=rank)]
    assert sorted((d, i) for d, indices in keys for i in indices) == [(0, i) for i in range(5)] + [(1, i)
                                                                                                   for i in range(3)]


def test_sampler_rejects_a_dataset_smaller_than_one_step():
    with pytest.raises(ValueError, match="datasets.small has 3 training examples"):
        CurriculumSampler([10, 3], torch.ones(2, dtype=torch.float64) / 2, torch.zeros(2), batch_size=2,
                          num_batches=1, num_replicas=2, names=["large", "small"])


# ---- end to end through the CLI -----------------------------------------------------------------------------

MODEL = "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, " \
        "num_key_value_heads: 2, max_position_embeddings: 256, tie_word_embeddings: true}"

SFT_CONFIG = f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: logs, name: run}}
  callbacks:
    - class_path: lit_distill.callbacks.Autocurriculum
      init_args: {{estimate_every: 3, refresh_every: 5}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: val/loss, save_top_k: 1, save_last: true, dirpath: checkpoints}}
model:
  class_path: lit_distill.modules.SFTModule
  init_args:
    model: {{tokenizer: lit-distill/tokenizer, config: {MODEL}}}
    optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 0.01}}}}
data:
  class_path: lit_distill.data.CurriculumDataModule
  init_args:
    batch_size: 4
    batches_per_epoch: 7
    lr: 0.5
    difficulty_sample_size: 8
    datasets:
      text:
        class_path: lit_distill.data.WikiTextDataModule
        init_args: {{embedded_documents: 60, block_size: 32, max_blocks: {{validation: 4}}}}
      qa:
        class_path: lit_distill.data.SQuADDataModule
        init_args: {{embedded_examples: 80, max_length: 96, max_examples: {{validation: 4}}}}
"""


def fit(tmp_path, config: str, *args: str):
    (tmp_path / "curriculum.yaml").write_text(config)
    return LitDistillCLI(args=["fit", "--config", str(tmp_path / "curriculum.yaml"), *args])


def test_weights_move_are_logged_and_resume_continues_exactly(tmp_path, monkeypatch):
    """Two epochs in one run equal one epoch, then a resume from ``last.ckpt``: model, weights, velocity, sample
    counts and the snapshot's measurements."""
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    for path in (straight, first, resumed):
        path.mkdir()
    monkeypatch.chdir(straight)
    full = fit(straight, SFT_CONFIG)
    monkeypatch.chdir(first)
    fit(first, SFT_CONFIG, "--trainer.max_epochs", "1")
    monkeypatch.chdir(resumed)
    again = fit(resumed, SFT_CONFIG, "--ckpt_path", str(first / "checkpoints" / "last.ckpt"))

    assert full.trainer.global_step == again.trainer.global_step == 14
    for key, value in full.datamodule.state_dict().items():
        assert value == again.datamodule.state_dict()[key] if key == "names" else torch.equal(
            value, again.datamodule.state_dict()[key]), key
    assert full.datamodule.samples_drawn.sum().item() >= 14 * 4
    assert not torch.allclose(full.datamodule.weights, torch.full((2,), 0.5, dtype=torch.float64))
    for (name, expected), actual in zip(full.model.state_dict().items(), again.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)

    header, *rows = (straight / "logs/run/version_0/metrics.csv").read_text().splitlines()
    assert all(f"curriculum/{name}/{kind}" in header.split(",") for name in ("text", "qa")
               for kind in ("weight", "difficulty", "variance", "samples"))
    checkpoints = sorted(path.name for path in (straight / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2  # last + the best by val/loss


def test_the_snapshot_measures_once_per_refresh(tmp_path, monkeypatch):
    """Estimates at steps 0, 3 and 6, a refresh at 5: the snapshot scores its fixed sample at 0 and at 6 only, and
    the estimate at 3 reuses the numbers of 0."""
    import lit_distill.callbacks.curriculum as curriculum

    monkeypatch.chdir(tmp_path)
    scored_at = []
    (tmp_path / "curriculum.yaml").write_text(SFT_CONFIG)
    cli = LitDistillCLI(args=["--config", str(tmp_path / "curriculum.yaml"), "--trainer.max_epochs", "1"], run=False)

    def counted(model, batch):
        scored_at.append(cli.trainer.global_step)
        return example_losses(model, batch)

    monkeypatch.setattr(curriculum, "example_losses", counted)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert sorted(set(scored_at)) == [0, 6]
    header, *rows = (tmp_path / "logs/run/version_0/metrics.csv").read_text().splitlines()
    difficulty = {int(row["step"]): row["curriculum/text/difficulty"] for row in csv.DictReader([header, *rows])
                  if row["curriculum/text/difficulty"]}
    assert difficulty[3] == difficulty[0] != difficulty[6]


def test_resume_with_other_datasets_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(tmp_path, SFT_CONFIG, "--trainer.max_epochs", "1")
    renamed = SFT_CONFIG.replace("      qa:\n", "      squad:\n")
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"data.init_args.datasets.qa: only in the checkpoint\n  "
                                         r"data.init_args.datasets.squad: only in the config\n"):
        fit(tmp_path, renamed, "--ckpt_path", last)
    with pytest.raises(ValueError, match=r"checkpoint's curriculum has datasets \['text', 'qa'\]"):
        fit(tmp_path, renamed, "--ckpt_path", last, "--resume_config", "config")


def test_members_take_overrides_and_overlays_and_record_their_own_hyperparameters(tmp_path, monkeypatch):
    """A dotted override and an overlay config reach a curriculum member's arguments; each member records its own
    hyperparameters, not the config LightningCLI hands to the configured DataModule (the curriculum's)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "curriculum.yaml").write_text(SFT_CONFIG)
    (tmp_path / "overlay.yaml").write_text("data:\n  init_args:\n    datasets:\n      text:\n        init_args:\n"
                                           "          max_blocks: {train: 5}\n")
    cli = LitDistillCLI(args=["--config", "curriculum.yaml", "--config", "overlay.yaml",
                              "--data.init_args.datasets.text.init_args.block_size", "24"], run=False)
    text = cli.datamodule.modules["text"]
    assert (text.hparams.block_size, text.hparams.max_blocks) == (24, {"train": 5})
    assert "_class_path" not in text.hparams and "datasets" not in text.hparams
    assert cli.datamodule.hparams["_class_path"] == "lit_distill.data.CurriculumDataModule"


def test_datasets_must_share_one_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = load_tokenizer("lit-distill/tokenizer")
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "extended")
    extended = tmp_path / "extended"
    other = SFT_CONFIG.replace("{embedded_examples: 80,", f"{{tokenizer: {extended}, embedded_examples: 80,")
    (tmp_path / "curriculum.yaml").write_text(other)
    with pytest.raises(ValueError, match="datasets.qa uses a tokenizer .* different vocabulary from datasets.text"):
        LitDistillCLI(args=["--config", str(tmp_path / "curriculum.yaml")], run=False)


def test_distill_and_grpo_train_on_a_curriculum(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    distill = SFT_CONFIG.replace("class_path: lit_distill.modules.SFTModule", "class_path: lit_distill.modules."
                                 "DistillModule").replace(
        f"model: {{tokenizer: lit-distill/tokenizer, config: {MODEL}}}",
        f"teacher: {{name_or_path: lit-distill/tiny-teacher}}\n    student: {{tokenizer: lit-distill/tiny-teacher, "
        f"config: {MODEL}}}")
    distill = distill.replace("block_size: 32", "block_size: 32, tokenizer: lit-distill/tiny-teacher").replace(
        "{embedded_examples: 80,", "{tokenizer: lit-distill/tiny-teacher, embedded_examples: 80,")
    cli = fit(tmp_path, distill, "--trainer.max_epochs", "1")
    assert cli.trainer.global_step == 7 and cli.datamodule.difficulty.isfinite().all()

    grpo = textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: 4
          limit_val_batches: 0
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          callbacks:
            - class_path: lit_distill.callbacks.Autocurriculum
              init_args: {{estimate_every: 2, refresh_every: 2}}
        model:
          class_path: lit_distill.modules.GRPOModule
          init_args:
            policy: {{tokenizer: lit-distill/tokenizer, config: {MODEL}}}
            rewards: [{{class_path: lit_distill.rewards.ArithmeticReward}}]
            num_generations: 2
            sampling: {{max_new_tokens: 4}}
        data:
          class_path: lit_distill.data.CurriculumDataModule
          init_args:
            batch_size: 2
            difficulty_sample_size: 4
            datasets:
              words: {{class_path: lit_distill.data.JSONLPromptDataModule, init_args: {{embedded: arithmetic,
                       num_embedded: 20}}}}
              digits: {{class_path: lit_distill.data.JSONLPromptDataModule, init_args: {{embedded:
                        arithmetic_statements, num_embedded: 20}}}}
        """)
    cli = fit(tmp_path, grpo)
    assert cli.datamodule.difficulty.isfinite().all() and cli.datamodule.samples_drawn.sum() >= 4 * 2


DDP_RECORDER = '''
import json
import lightning as L


class RecordCurriculum(L.Callback):
    """Writes this rank's weights and drawn dataset of every batch, for the test."""

    def __init__(self):
        self.records = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        datamodule = trainer.datamodule
        self.records.append({"step": trainer.global_step, "keys": sorted(batch),
                             "tokens": batch["input_ids"].tolist(), "weights": datamodule.weights.tolist(),
                             "difficulty": datamodule.difficulty.tolist()})

    def on_train_end(self, trainer, pl_module):
        with open(f"rank{trainer.global_rank}_of_{trainer.world_size}.json", "w") as file:
            json.dump(self.records, file)
'''


def test_ddp_ranks_agree_on_weights_and_split_the_measurement(tmp_path):
    """2 CPU processes: identical weights on both ranks at every step, batches of one dataset per step with
    different examples, and the measurement split over the ranks equals the 1-process one."""
    (tmp_path / "recorder.py").write_text(DDP_RECORDER)
    measured = "      init_args: {estimate_every: 3, refresh_every: 5}\n"
    config = SFT_CONFIG.replace(measured, measured + "    - class_path: recorder.RecordCurriculum\n")
    (tmp_path / "curriculum.yaml").write_text(config)
    common = ["fit", "--config", "curriculum.yaml", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
              "--trainer.logger", "false"]
    run_cli(common + ["--trainer.devices", "2", "--trainer.strategy", "ddp"], cwd=tmp_path)
    run_cli(common, cwd=tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}_of_2.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "rank0_of_1.json").read_text())
    assert len(rank0) == len(rank1) == 7
    for first, second in zip(rank0, rank1):
        assert first["weights"] == second["weights"] and first["keys"] == second["keys"]
        assert first["tokens"] != second["tokens"]
    assert rank0[-1]["weights"] != rank0[0]["weights"]
    # Step 0's measurement uses the same initial model: 4 + 4 examples per dataset on two ranks, 8 on one.
    torch.testing.assert_close(torch.tensor(rank0[0]["difficulty"]), torch.tensor(single[0]["difficulty"]))


def test_quickstart_moves_the_weights_and_writes_checkpoints_and_samples(tmp_path, monkeypatch):
    """The curriculum quickstart, shortened to 100 steps (with a larger step size η to make up for it): the weights
    leave uniform, the easiest dataset (the dialogs) loses weight, and the run leaves its best/last checkpoints, sample
    table and saved model."""
    monkeypatch.chdir(tmp_path)
    overrides = ["--trainer.max_epochs", "2", "--data.init_args.batches_per_epoch", "50", "--data.init_args.lr", "0.15"]
    for name in ("dialog", "text", "synthetic_language"):
        overrides += [f"--data.init_args.datasets.{name}.init_args.embedded_documents", "300"]
    cli = LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/curriculum/quickstart.yaml"), *overrides])
    datamodule = cli.datamodule
    assert (datamodule.weights - 1 / 3).abs().max() > 0.05
    assert datamodule.difficulty.argmin() == datamodule.names.index("dialog")
    assert datamodule.weights.argmin() == datamodule.names.index("dialog")
    run = tmp_path / "runs/curriculum_quickstart"
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["epoch=1-step=100.ckpt", "last.ckpt"]
    assert len((run / "version_0/samples.jsonl").read_text().splitlines()) == 3 * 2  # step 0 and the end
    assert (run / "model/model.safetensors").exists()


def test_example_losses_against_a_naive_per_example_mean(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 11, 12, -100, -100]])
    with torch.no_grad():
        losses = example_losses(model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
        expected = []
        for row in range(2):
            logits = model(input_ids[row:row + 1, :attention_mask[row].sum()]).logits[0]  # (T, V) unpadded
            scored = [t for t in range(1, int(attention_mask[row].sum())) if labels[row, t] != -100]
            expected.append(-sum(logits[t - 1].log_softmax(-1)[labels[row, t]] for t in scored) / len(scored))
        torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-5, atol=1e-5)
        # A prompt-only batch (left-padded) scores its real prompt tokens after the first.
        prompt = {"prompt_input_ids": torch.tensor([[0, 5, 6, 7]]),
                  "prompt_attention_mask": torch.tensor([[0, 1, 1, 1]])}
        logits = model(torch.tensor([[5, 6, 7]])).logits[0]
        naive = -(logits[0].log_softmax(-1)[6] + logits[1].log_softmax(-1)[7]) / 2
        torch.testing.assert_close(example_losses(model, prompt), naive[None], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="neither .*chosen_input_ids"):
        example_losses(model, {"chosen_input_ids": input_ids})
