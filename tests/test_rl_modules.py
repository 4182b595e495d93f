"""PPOModule and GRPOModule: exact on-policy ratios, gradient accumulation equivalence, zero-std groups, reference
variants, checkpoints, pico models, and a 2-process CPU DDP run through the CLI."""

import json

import lightning as L
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lit_distill.models.loading import LoRASpec, ModelSpec
from lit_distill.modules.grpo import GRPOModule
from lit_distill.modules.ppo import PPOModule
from lit_distill.modules.rl import completion_forward
from lit_distill.rewards import Reward
from lit_distill.rollout import Sampling, left_pad
from lit_distill.cli import LitDistillCLI
from tests.test_cli import ROOT, run_cli

PROMPTS = ["Mara is a baker", "The cat", "Seven plus five is", "Hugo lives in", "A", "Lena has a red", "Ben", "Ivy"]


class LetterCount(Reward):
    """A deterministic reward with spread: the number of letters 'e' in the completion."""

    def forward(self, prompts, completions, **columns):
        return [float(completion.count("e")) for completion in completions]


class Constant(Reward):
    def forward(self, prompts, completions, **columns):
        return [1.0] * len(completions)


def prompt_batches(tokenizer, batch_size=4, num_batches=2):
    batches = []
    for start in range(0, batch_size * num_batches, batch_size):
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(start, start + batch_size)]
        ids, mask = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
        batches.append({"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt": texts,
                        "answer": ["x"] * batch_size})
    return batches


def fit(module, batches, max_steps):
    """Train on ``batches``: a list of ready batches, or a DataLoader used as it is."""
    # log_every_n_steps=1: the tests read the last rollout's statistics from callback_metrics.
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1)
    loader = batches if isinstance(batches, torch.utils.data.DataLoader) else \
        torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, loader)
    return trainer


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def ppo(llama_dir, **kwargs):
    torch.manual_seed(0)  # the value head's initialisation
    settings = dict(policy=ModelSpec(llama_dir), rewards=[LetterCount()], sampling=Sampling(max_new_tokens=6), seed=3,
                    optimizer=sgd(0.0))
    settings.update(kwargs)
    return PPOModule(**settings)


def grpo(llama_dir, **kwargs):
    settings = dict(policy=ModelSpec(llama_dir), rewards=[LetterCount()], sampling=Sampling(max_new_tokens=6),
                    num_generations=4, seed=3, optimizer=sgd(0.0))
    settings.update(kwargs)
    return GRPOModule(**settings)


def trained_parameters(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def test_ppo_with_zero_lr_has_ratio_exactly_one_and_no_clipping(llama_dir, tokenizer):
    module = ppo(llama_dir, ppo_epochs=2, num_minibatches=2, micro_batch_size=1)
    before = trained_parameters(module)
    trainer = fit(module, prompt_batches(tokenizer), max_steps=8)  # 2 rollouts × 2 epochs × 2 minibatches
    metrics = trainer.callback_metrics
    assert metrics["ppo/ratio"].item() == 1.0
    assert metrics["ppo/clipfrac"].item() == 0.0 and metrics["ppo/approx_kl"].item() == 0.0
    assert trainer.global_step == 8
    assert_unchanged(module, before)
    assert "rollout/kl" in metrics and metrics["rollout/kl"].item() == 0.0  # the reference is the same policy
    for name in ("ppo/value_loss", "ppo/explained_variance", "ppo/entropy", "rollout/reward_mean",
                 "rollout/completion_length", "rewards/letter_count", "perf/tokens_per_s"):
        assert torch.isfinite(metrics[name]), name


def test_grpo_with_several_iterations_and_zero_lr_has_ratio_exactly_one(llama_dir, tokenizer):
    module = grpo(llama_dir, num_iterations=3, micro_batch_size=3, beta=0.1)
    trainer = fit(module, prompt_batches(tokenizer, batch_size=2), max_steps=6)
    metrics = trainer.callback_metrics
    assert metrics["grpo/clip_ratio"].item() == 0.0 and metrics["grpo/approx_kl"].item() == 0.0
    assert metrics["grpo/kl"].item() == 0.0
    for name in ("rollout/reward_mean", "rollout/reward_std", "grpo/frac_zero_std", "grpo/entropy"):
        assert torch.isfinite(metrics[name]), name


def assert_unchanged(module, before):
    for name, value in trained_parameters(module).items():
        assert torch.equal(value, before[name]), name


def one_update(module, tokenizer, batch_size):
    fit(module, prompt_batches(tokenizer, batch_size=batch_size, num_batches=1), max_steps=1)
    return trained_parameters(module)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_accumulating_micro_batches_equals_one_batch(llama_dir, tokenizer, loss_type):
    whole = one_update(grpo(llama_dir, loss_type=loss_type, optimizer=sgd(1.0), max_grad_norm=None), tokenizer, 2)
    micro = one_update(grpo(llama_dir, loss_type=loss_type, optimizer=sgd(1.0), max_grad_norm=None,
                            micro_batch_size=1), tokenizer, 2)
    initial = trained_parameters(grpo(llama_dir))
    assert any(not torch.equal(whole[name], initial[name]) for name in whole)  # the update did something
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ppo_accumulating_micro_batches_equals_one_batch(llama_dir, tokenizer):
    settings = dict(optimizer=sgd(1.0), max_grad_norm=None, ppo_epochs=1, whiten_advantages=False)
    whole = one_update(ppo(llama_dir, **settings), tokenizer, 4)
    micro = one_update(ppo(llama_dir, micro_batch_size=1, **settings), tokenizer, 4)
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grpo_zero_std_groups_give_zero_advantage_finite_loss_and_no_update(llama_dir, tokenizer):
    module = grpo(llama_dir, rewards=[Constant()], beta=0.0, optimizer=sgd(1.0))
    before = trained_parameters(module)
    trainer = fit(module, prompt_batches(tokenizer, batch_size=2, num_batches=1), max_steps=1)
    assert trainer.callback_metrics["grpo/frac_zero_std"].item() == 1.0
    assert trainer.callback_metrics["grpo/loss"].item() == 0.0
    assert_unchanged(module, before)
    assert module.reference is None  # β = 0 builds no reference


def test_grpo_masked_truncated_completions_leave_the_loss(llama_dir, tokenizer):
    # A random model almost never samples EOS within 2 tokens: every completion is truncated, nothing is learnt.
    module = grpo(llama_dir, sampling=Sampling(max_new_tokens=2), mask_truncated_completions=True, beta=0.0,
                  optimizer=sgd(1.0))
    before = trained_parameters(module)
    trainer = fit(module, prompt_batches(tokenizer, batch_size=2, num_batches=1), max_steps=1)
    assert trainer.callback_metrics["rollout/truncated_frac"].item() == 1.0
    assert trainer.callback_metrics["grpo/loss"].item() == 0.0
    assert_unchanged(module, before)


def test_ppo_missing_eos_penalty_lowers_the_score_of_truncated_completions(llama_dir, tokenizer):
    module = ppo(llama_dir, rewards=[Constant()], sampling=Sampling(max_new_tokens=2), missing_eos_penalty=3.0)
    trainer = fit(module, prompt_batches(tokenizer, num_batches=1), max_steps=module.updates_per_rollout())
    assert trainer.callback_metrics["rollout/truncated_frac"].item() == 1.0
    assert trainer.callback_metrics["rollout/reward_mean"].item() == -2.0


def test_lora_policy_uses_the_adapter_disabled_base_as_reference(llama_dir, tokenizer):
    module = ppo(llama_dir, policy=ModelSpec(llama_dir, lora=LoRASpec(r=4, alpha=8)), optimizer=sgd(0.5),
                 kl_estimator="k3")
    assert module.reference is None and module.uses_adapter_reference
    fit(module, prompt_batches(tokenizer), max_steps=2)
    ids, mask = left_pad([tokenizer("The cat")["input_ids"], tokenizer("Mara")["input_ids"]], tokenizer.pad_token_id)
    rollout = module.sample(ids, mask)
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    expected = completion_forward(base, rollout.sequences, rollout.attention_mask, rollout.prompt_length, 1.0)
    torch.testing.assert_close(module.reference_logprobs(rollout), expected.logprobs)
    trained = completion_forward(module.model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, 1.0)
    assert not torch.allclose(trained.logprobs, expected.logprobs)  # the adapter did learn something


def test_frozen_models_and_rewards_stay_out_of_the_checkpoint_and_the_optimizer(llama_dir, tmp_path, tokenizer):
    module = ppo(llama_dir, kl_coef=0.1)
    trainer = fit(module, prompt_batches(tokenizer, num_batches=1), max_steps=1)
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    state = torch.load(tmp_path / "ppo.ckpt", weights_only=False)["state_dict"]
    assert not any(key.startswith(("reference.", "rewards.")) for key in state)
    assert any(key.startswith("value_head.") for key in state)
    optimized = {id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in module.reference.parameters())
    assert all(id(p) in optimized for p in module.value_head.parameters())
    assert not module.reference.training and not module.model.training  # dropout off while training


@pytest.mark.parametrize("model_type", ["pico_transformer", "pico_lstm", "pico_kgram"])
def test_ppo_and_grpo_run_with_pico_models(model_type, tokenizer):
    spec = ModelSpec(tokenizer="lit-distill/tokenizer", config={"model_type": model_type, "hidden_size": 32})
    for module in (PPOModule(spec, rewards=[LetterCount()], sampling=Sampling(max_new_tokens=4)),
                   GRPOModule(spec, rewards=[LetterCount()], sampling=Sampling(max_new_tokens=4), num_generations=2)):
        trainer = fit(module, prompt_batches(tokenizer, num_batches=1), max_steps=module.updates_per_rollout())
        assert torch.isfinite(trainer.callback_metrics["rollout/reward_mean"])


RANK_LOG_REWARD = """
import json, os

def record(prompts, completions, **columns):
    with open(f"completions_rank{os.environ.get('LOCAL_RANK', '0')}.jsonl", "a") as handle:
        handle.write(json.dumps({"prompts": prompts, "completions": completions}) + "\\n")
    return [float(len(completion)) for completion in completions]
"""


def test_grpo_ddp_two_processes_complete_with_different_samples_per_rank(tmp_path, llama_dir):
    """Every prompt is the same text, so only the per-rank sampling seed can make the ranks' completions differ;
    ragged completion lengths across ranks must not hang the collective calls."""
    (tmp_path / "rank_log_reward.py").write_text(RANK_LOG_REWARD)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "Mara is a baker and"}\n' * 16)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 2, "logger": False,
                    "enable_checkpointing": False, "limit_val_batches": 0},
        "model": {"class_path": "lit_distill.modules.GRPOModule",
                  "init_args": {"policy": {"name_or_path": llama_dir}, "num_generations": 2,
                                "sampling": {"max_new_tokens": 8},
                                "rewards": [{"class_path": "lit_distill.rewards.CallableReward",
                                             "init_args": {"function": "rank_log_reward.record"}}],
                                "save_dir": str(tmp_path / "model")}},
        "data": {"class_path": "lit_distill.data.JSONLPromptDataModule",
                 "init_args": {"path": str(prompts), "batch_size": 2, "validation_fraction": 0.25}},
    }
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(config))
    run_cli(["fit", "--config", str(tmp_path / "grpo.yaml")], cwd=tmp_path)
    assert (tmp_path / "model" / "config.json").is_file()
    logs = [[json.loads(line) for line in (tmp_path / f"completions_rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)]
    assert len(logs[0]) == len(logs[1]) == 2  # one generation round per update
    assert logs[0][0]["prompts"] == logs[1][0]["prompts"]
    assert [round["completions"] for round in logs[0]] != [round["completions"] for round in logs[1]]


@pytest.mark.parametrize("config,updates", [("ppo/quickstart", 4), ("grpo/quickstart", 2), ("grpo/self_distill", 2),
                                            ("ppo/embedding_cosine", 4), ("dpo/online", 2)])
def test_rl_quickstarts_run_and_report(config, updates, tmp_path):
    LitDistillCLI(args=["fit", "--config", str(ROOT / f"configs/{config}.yaml"), "--trainer.max_steps", str(updates),
                        "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
                        "--trainer.callbacks.init_args.max_batches", "1",
                        "--data.init_args.num_embedded", "64", "--data.init_args.batch_size", "4",
                        "--data.init_args.eval_batch_size", "4",
                        "--trainer.logger.init_args.save_dir", str(tmp_path),
                        "--model.init_args.save_dir", str(tmp_path / "model")])
    report = json.loads(next(tmp_path.rglob("rl_report.json")).read_text())
    assert {"reward_mean_before", "reward_mean_after", "completion_length_after"} <= report.keys()
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "rollout/reward_mean" in metrics and "val/reward_mean" in metrics
    saved = tmp_path / "model"
    assert (saved / "config.json").is_file() or (saved / "merged" / "config.json").is_file()  # LoRA: merged/
