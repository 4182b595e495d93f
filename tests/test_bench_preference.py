"""The reward and DPO benchmarks: each side trains, and both sides see the same batches of the same workload."""

import math

import pytest
import torch
from safetensors.torch import load_file

from lit_distill.bench import dpo, reward, timing, trainers
from lit_distill.bench.workload import Options, build

OPTIONS = Options(steps=2, warmup=1, batch_size=4)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    timing.quiet()
    return build(tmp_path_factory.mktemp("bench_preference"), num_rows=48)


def initial_weights(workload) -> dict[str, torch.Tensor]:
    return load_file(f"{workload.model('policy')}/model.safetensors")


def first_batch(workload):
    datamodule = reward.preference_datamodule(workload, OPTIONS)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize("measurement", [reward, dpo], ids=["reward", "dpo"])
def test_ours_trains_the_policy_for_the_requested_steps(workload, measurement):
    module = measurement.build_module(workload, OPTIONS)
    clock = timing.StepClock(OPTIONS.warmup)
    trainer = trainers.lightning_trainer(OPTIONS, clock)
    trainer.fit(module, datamodule=reward.preference_datamodule(workload, OPTIONS))

    assert trainer.global_step == clock.last_step == OPTIONS.warmup + OPTIONS.steps
    assert math.isfinite(clock.steps_per_s) and clock.steps_per_s > 0
    before = initial_weights(workload)["model.layers.0.self_attn.q_proj.weight"]
    after = module.model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(before, after)
    if measurement is dpo:  # the frozen reference keeps the initial weights
        torch.testing.assert_close(module.reference.state_dict()["model.layers.0.self_attn.q_proj.weight"], before)


@pytest.mark.parametrize("measurement", [reward, dpo], ids=["reward", "dpo"])
def test_measurement_returns_a_speed(workload, measurement):
    (entry,) = measurement.MEASUREMENTS
    speed = entry.ours(workload, OPTIONS)
    assert math.isfinite(speed) and speed > 0


def test_lightning_trainer_settings():
    trainer = trainers.lightning_trainer(OPTIONS, timing.StepClock(1), max_epochs=1)
    assert trainer.max_steps == OPTIONS.warmup + OPTIONS.steps and trainer.max_epochs == 1
    assert trainer.gradient_clip_val == 1.0 and trainer.accumulate_grad_batches == 1
    assert trainer.logger is None and trainer.checkpoint_callback is None
    assert trainer.precision == "32-true"


def test_step_clock_needs_a_warmup_and_a_timed_step():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        timing.StepClock(warmup=0)
    clock = timing.StepClock(warmup=2)
    for step in (1, 2):
        clock.tick(step)
    with pytest.raises(RuntimeError, match="before the 2 warm-up steps were over"):
        clock.steps_per_s
    clock.tick(3)
    assert clock.steps_per_s > 0


# ---- TRL's side ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("measurement", [reward, dpo], ids=["reward", "dpo"])
def test_trl_trains_the_same_workload(workload, measurement):
    pytest.importorskip("trl")
    clock = timing.StepClock(OPTIONS.warmup)
    trainer = measurement.build_trl_trainer(workload, OPTIONS, clock)
    args = trainer.args
    assert (args.activation_checkpointing, args.bf16, args.fp16) == (False, False, False)
    assert args.lr_scheduler_type == "constant" and args.optim == "adamw_torch_fused" and args.weight_decay == 0
    assert args.max_steps == OPTIONS.warmup + OPTIONS.steps and args.per_device_train_batch_size == 4

    speed = trainers.trl_fit(trainer, clock)
    assert trainer.state.global_step == clock.last_step == OPTIONS.warmup + OPTIONS.steps
    assert math.isfinite(speed) and speed > 0
    before = initial_weights(workload)["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(before, trainer.model.state_dict()["model.layers.0.self_attn.q_proj.weight"].cpu())


@pytest.mark.parametrize("measurement", [reward, dpo], ids=["reward", "dpo"])
def test_both_sides_get_the_same_first_batch(workload, measurement):
    pytest.importorskip("trl")
    ours = first_batch(workload)
    theirs = next(iter(measurement.build_trl_trainer(workload, OPTIONS, timing.StepClock(1)).get_train_dataloader()))
    for key in ("input_ids", "attention_mask"):
        torch.testing.assert_close(theirs[key].cpu(), torch.cat([ours[f"chosen_{key}"], ours[f"rejected_{key}"]]))
    if measurement is dpo:  # the loss tokens: the completions with their EOS
        labels = torch.cat([ours["chosen_labels"], ours["rejected_labels"]])
        torch.testing.assert_close(theirs["completion_mask"].cpu(), (labels != -100).long())


def test_dpo_first_step_agrees(workload):
    """Same weights, same batch: both sides start at loss log 2 with the same policy log-probs."""
    pytest.importorskip("trl")
    batch = first_batch(workload)
    module = dpo.build_module(workload, OPTIONS)
    trainer = dpo.build_trl_trainer(workload, OPTIONS, timing.StepClock(1))
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()  # TRL's metrics are keyed by the mode
    with torch.no_grad():
        loss, _, chosen, rejected = module.preference_loss(batch, reduction="mean")
        trl_loss = trainer.compute_loss(trainer.model, inputs)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert trl_loss.item() == pytest.approx(math.log(2), abs=1e-6)
    metrics = trainer._metrics["train"]
    assert metrics["logps/chosen"][0] == pytest.approx(chosen.mean().item(), abs=1e-3)
    assert metrics["logps/rejected"][0] == pytest.approx(rejected.mean().item(), abs=1e-3)
