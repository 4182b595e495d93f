"""The KD and GRPO benchmarks: each side trains, and both sides get the same prompts, batches and (KD off-policy)
the same first losses."""

import math

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lit_distill.bench import grpo, kd, timing, trainers
from lit_distill.bench.workload import Options, build

OPTIONS = Options(steps=2, warmup=1, batch_size=4, new_tokens=8, num_generations=2)
WEIGHT = "model.layers.0.self_attn.q_proj.weight"
KD = {"kd_off_policy": False, "kd_on_policy": True}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    timing.quiet()
    return build(tmp_path_factory.mktemp("bench_rl"), num_rows=48)


def initial_weight(workload, model: str) -> torch.Tensor:
    return load_file(f"{workload.model(model)}/model.safetensors")[WEIGHT]


def optimizer_steps(optimizer) -> int:
    """The AdamW step count of the optimizer's first parameter (what ``optimizer.step()`` advanced)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    first = optimizer.param_groups[0]["params"][0]
    return int(optimizer.state[first]["step"])


def test_measurements_are_listed():
    assert [m.name for m in kd.MEASUREMENTS] == ["kd_off_policy", "kd_on_policy"]
    assert [m.name for m in grpo.MEASUREMENTS] == ["grpo"]
    assert all(m.trl is not None for m in kd.MEASUREMENTS + grpo.MEASUREMENTS)


# ---- lit_distill's side ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["kd_off_policy", "kd_on_policy", "grpo"])
def test_ours_trains_for_the_requested_steps(workload, name, monkeypatch):
    """The measurement's own ``ours`` returns a speed, and the run it timed changed the trained model's weights."""
    runs = []
    fit = trainers.lightning_fit

    def recording_fit(module, datamodule, options, **overrides):
        runs.append(module)
        return fit(module, datamodule, options, **overrides)

    monkeypatch.setattr(trainers, "lightning_fit", recording_fit)
    measurement = {m.name: m for m in kd.MEASUREMENTS + grpo.MEASUREMENTS}[name]
    speed = measurement.ours(workload, OPTIONS)

    assert math.isfinite(speed) and speed > 0
    (module,) = runs
    assert module.trainer.global_step == OPTIONS.warmup + OPTIONS.steps
    assert optimizer_steps(module.optimizers().optimizer) == OPTIONS.warmup + OPTIONS.steps
    if name != "grpo":  # GRPO's random policy earns no reward variance in 3 steps: zero advantages, zero gradient
        assert not torch.allclose(initial_weight(workload, "student"), module.model.state_dict()[WEIGHT])
    frozen = module.reference if name == "grpo" else module.teacher  # never updated
    torch.testing.assert_close(frozen.state_dict()[WEIGHT],
                               initial_weight(workload, "policy" if name == "grpo" else "teacher"))


def test_on_policy_kd_prompts_are_the_whole_prompts(workload):
    """On-policy rows hold only the prompt, and ``prompt_tokens`` keeps all of it (no completion token leaks in)."""
    data = kd.datamodule(workload, OPTIONS, on_policy=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = kd.build_module(workload, OPTIONS, on_policy=True)
    assert module.hparams.prompt_tokens >= batch["attention_mask"].sum(-1).max()
    full = kd.datamodule(workload, OPTIONS, on_policy=False)
    full.setup("fit")
    full_batch = next(iter(full.train_dataloader()))
    for ids, mask, full_ids, full_mask, labels in zip(batch["input_ids"], batch["attention_mask"],
                                                      full_batch["input_ids"], full_batch["attention_mask"],
                                                      full_batch["labels"]):
        prompt = full_ids[(labels == -100) & (full_mask == 1)]
        assert ids[mask.bool()].tolist() == prompt.tolist()


# ---- TRL's side ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["kd_off_policy", "kd_on_policy", "grpo"])
def test_trl_trains_for_the_requested_steps(workload, name):
    pytest.importorskip("trl")
    clock = timing.StepClock(OPTIONS.warmup)
    if name == "grpo":
        trainer = grpo.build_trl_trainer(workload, OPTIONS, clock)
        args = trainer.args
        assert args.per_device_train_batch_size == OPTIONS.batch_size * OPTIONS.num_generations
        assert (args.steps_per_generation, args.num_iterations, args.gradient_accumulation_steps) == (1, 1, 1)
        assert (args.beta, args.loss_type, args.scale_rewards) == (grpo.BETA, "dapo", "group")
        assert args.generation_batch_size == OPTIONS.batch_size * OPTIONS.num_generations
    else:
        trainer = kd.build_trl_trainer(workload, OPTIONS, KD[name], clock)
        args = trainer.args
        assert (args.lmbda, args.beta, args.temperature) == (float(KD[name]), 0.0, 1.0)
        assert args.per_device_train_batch_size == OPTIONS.batch_size
    assert (args.activation_checkpointing, args.bf16, args.fp16) == (False, False, False)
    assert args.lr_scheduler_type == "constant" and args.optim == "adamw_torch_fused" and args.max_grad_norm == 1.0

    speed = trainers.trl_fit(trainer, clock)
    assert trainer.state.global_step == clock.last_step == OPTIONS.warmup + OPTIONS.steps
    assert math.isfinite(speed) and speed > 0
    assert optimizer_steps(trainer.optimizer) == OPTIONS.warmup + OPTIONS.steps
    if name != "grpo":
        assert not torch.allclose(initial_weight(workload, "student"), trainer.model.state_dict()[WEIGHT].cpu())


@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
def test_kd_both_sides_get_the_same_batches(workload, on_policy):
    """TRL's first batch: lit_distill's off-policy batch exactly, and prompts equal to lit_distill's on-policy rows."""
    pytest.importorskip("trl")
    pairs = kd.datamodule(workload, OPTIONS, on_policy=False)
    pairs.setup("fit")
    ours = next(iter(pairs.train_dataloader()))
    theirs = next(iter(kd.build_trl_trainer(workload, OPTIONS, on_policy, timing.StepClock(1))
                       .get_train_dataloader()))
    for key in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(theirs[key].cpu(), ours[key])
    prompts = kd.datamodule(workload, OPTIONS, on_policy=True)
    prompts.setup("fit")
    our_prompts = next(iter(prompts.train_dataloader()))
    assert ([ids[mask.bool()].tolist() for ids, mask in zip(our_prompts["input_ids"], our_prompts["attention_mask"])]
            == [ids[mask.bool()].tolist() for ids, mask in zip(theirs["prompts"], theirs["prompt_attention_mask"])])


def test_kd_off_policy_first_losses_agree(workload):
    """Same weights, same batches, same optimizer: the forward KL of the first two steps agrees on both sides."""
    pytest.importorskip("trl")
    options = Options(steps=1, warmup=1, batch_size=4)
    ours = []

    class Loss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ours.append(trainer.callback_metrics["train/loss"].item())

    # log_every_n_steps=1: lit_distill's modules log their step metrics on the steps the loggers write only.
    trainers.lightning_trainer(options, timing.StepClock(1), callbacks=[Loss()], log_every_n_steps=1).fit(
        kd.build_module(workload, options, on_policy=False), datamodule=kd.datamodule(workload, options, False))
    clock = timing.StepClock(1)
    trainer = kd.build_trl_trainer(workload, options, False, clock)
    theirs = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        theirs.append(loss.item())
        return loss

    trainer.compute_loss = recording_compute_loss
    trainers.trl_fit(trainer, clock)
    assert len(ours) == len(theirs) == 2 and ours[0] > 0
    assert theirs == pytest.approx(ours, rel=1e-5)


def test_grpo_both_sides_get_the_same_prompts(workload):
    pytest.importorskip("trl")
    data = grpo.datamodule(workload, OPTIONS)
    data.setup("fit")
    ours = next(iter(data.train_dataloader()))
    trainer = grpo.build_trl_trainer(workload, OPTIONS, timing.StepClock(1))
    theirs = next(iter(trainer.get_train_dataloader()))  # each prompt repeated G times in a row
    assert len(theirs) == OPTIONS.batch_size * OPTIONS.num_generations
    assert [row["prompt"] for row in theirs] == [p for p in ours["prompt"] for _ in range(OPTIONS.num_generations)]
    assert [row["answer"] for row in theirs[:: OPTIONS.num_generations]] == ours["answer"]
    # TRL tokenises the prompt strings itself: the same ids as lit_distill's DataModule.
    ids = trainer.processing_class(text=ours["prompt"])["input_ids"]
    assert ids == [row[mask.bool()].tolist() for row, mask in zip(ours["prompt_input_ids"],
                                                                   ours["prompt_attention_mask"])]


def test_grpo_reward_is_lit_distills():
    rewards = grpo.arithmetic_reward(["What is 2 plus 3?"] * 3, [" 5", " 6", " five"], answer=["5"] * 3,
                                     trainer_state=None)
    assert rewards == [1.0, 0.0, 1.0]
