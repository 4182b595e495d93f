"""Every dataset format trains through the CLI (`python -m lit_distill fit`) with HFDataModule, in each module that
takes it: SFT, DPO, reward modelling, GRPO and the teacher↔student loop."""

from pathlib import Path

import pytest

from lit_distill.cli import LitDistillCLI
from lit_distill.data.examples import write_examples
from tests.test_cli import logged_metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    directory = tmp_path_factory.mktemp("examples")
    write_examples(directory, rows=80)
    return directory


def fit(config: str | list[str], data_file: Path, tmp_path: Path, *extra: str,
        overlay: Path = None) -> dict[str, list[float]]:
    """Two training steps (or more, as ``extra`` arguments say) and a validation pass of ``config`` (a list:
    composed) on ``data_file``: the logged metrics by name. ``overlay`` is one more config composed over them."""
    configs = [str(ROOT / name) for name in ([config] if isinstance(config, str) else config)]
    configs += [str(overlay)] if overlay else []
    cli = LitDistillCLI(args=["fit", *(argument for name in configs for argument in ("--config", name)),
                              "--data.init_args.path", str(data_file),
                              "--data.init_args.batch_size", "4", "--trainer.max_steps", "2",
                              "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
                              "--trainer.logger.init_args.save_dir", str(tmp_path),
                              "--model.init_args.save_dir", str(tmp_path / "model"), *extra])
    assert cli.trainer.global_step >= 2  # RL modules count each of a rollout's optimizer updates
    return logged_metrics(tmp_path)


@pytest.mark.parametrize("config, data_file, metric", [
    ("configs/sft/chat_quickstart.yaml", "messages", "val/ppl"),
    (["configs/sft/chat_quickstart.yaml", "configs/sft/text.yaml"], "text", "val/ppl"),
    (["configs/sft/chat_quickstart.yaml", "configs/sft/prompt_completion.yaml"], "prompt_completion", "val/ppl"),
    (["configs/sft/chat_quickstart.yaml", "configs/sft/prompt_completion.yaml"], "conversational_prompt_completion",
     "val/ppl"),
    ("configs/dpo/preference.yaml", "preference", "val/accuracy"),
    ("configs/dpo/preference.yaml", "conversational_preference", "val/accuracy"),
    ("configs/dpo/preference.yaml", "implicit_preference", "val/accuracy"),
    (["configs/dpo/preference.yaml", "configs/kto/preference.yaml"], "unpaired_preference", "val/margin"),
    ("configs/grpo/prompt_only.yaml", "prompt_only", "val/reward_mean"),
])
def test_each_format_trains_through_the_cli(examples, tmp_path, config, data_file, metric):
    metrics = fit(config, examples / f"{data_file}.jsonl", tmp_path, "--trainer.log_every_n_steps", "1")
    assert metrics[metric] and all(value == value for value in metrics[metric])  # logged, not NaN


def test_reward_model_and_agent_loop_take_it_too(examples, tmp_path):
    reward = tmp_path / "reward.yaml"
    reward.write_text("model:\n  init_args:\n    model: {name_or_path: lit-distill/tiny-teacher}\n"
                      "data:\n  class_path: lit_distill.data.HFDataModule\n  init_args: {max_length: 128}\n")
    metrics = fit("configs/reward/quickstart.yaml", examples / "preference.jsonl", tmp_path / "reward",
                  overlay=reward)
    assert metrics["val/accuracy"]
    agent = tmp_path / "agent.yaml"
    agent.write_text("data:\n  class_path: lit_distill.data.HFDataModule\n  init_args: {max_length: 128}\n")
    metrics = fit("configs/agent/quickstart.yaml", examples / "questions.jsonl", tmp_path / "agent",
                  overlay=agent)
    assert any(name.startswith("val/") for name, values in metrics.items() if values)


def test_distillation_live_and_from_the_logit_cache_and_ppo_take_it(examples, tmp_path):
    chat = tmp_path / "chat.yaml"
    chat.write_text("data:\n  class_path: lit_distill.data.HFDataModule\n  init_args: {tokenizer: lit-distill/tiny-teacher,"
                    " chat_template: default, max_length: 128}\n")
    live = fit("configs/quickstart.yaml", examples / "messages.jsonl", tmp_path / "live", overlay=chat)
    assert live["val/kd_divergence"]
    cache = tmp_path / "cache"
    cached = fit(["configs/quickstart.yaml", "configs/distill/cache_quickstart.yaml"], examples / "messages.jsonl",
                 tmp_path / "cached",
                 "--model.init_args.logit_cache.path", str(cache), overlay=chat)
    assert cached["val/kd_divergence"] and (cache / "cache.json").exists()
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("data:\n  class_path: lit_distill.data.HFDataModule\n  init_args: {max_length: 64}\n")
    # PPO takes several optimizer steps per rollout batch: enough for two batches and the validation after them.
    assert fit("configs/ppo/quickstart.yaml", examples / "prompt_only.jsonl", tmp_path / "ppo", "--trainer.max_steps",
               "100", overlay=prompts)["val/reward_mean"]
