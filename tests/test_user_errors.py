"""Mistakes a user can make get one clear error: range checks before any model is built (the model specs here name a
directory that does not exist: reaching the model build would raise another error), and at the command line one
message, exit code 2 and no traceback."""

from pathlib import Path

import pytest

from lit_distill.cli import LitDistillCLI, main
from lit_distill.data.io import DataFileError, read_jsonl
from lit_distill.models.loading import ModelSpec
from lit_distill.modules import AgentModule, DistillModule, DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule
from lit_distill.rollout import Sampling

ROOT = Path(__file__).resolve().parent.parent
MISSING = ModelSpec(name_or_path="/nonexistent/model")
GRPO = str(ROOT / "configs/grpo/quickstart.yaml")


@pytest.mark.parametrize("module, arguments, message", [
    (DistillModule, {"temperature": 0}, "temperature must be > 0"),
    (DistillModule, {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    (DistillModule, {"on_policy_fraction": 0.5, "sampling": {"temperature": -1.0}}, "temperature must be > 0"),
    (DistillModule, {"chunk_size": 0}, "chunk_size must be >= 1"),
    (GRPOModule, {"beta": -0.5}, "beta must be >= 0"),
    (GRPOModule, {"sampling": {"top_p": 0.0}}, r"top_p must be in \(0, 1\]"),
    (GRPOModule, {"clip_eps_high": 0.1}, r"clip_eps_high must be >= clip_eps \(0.2\)"),
    (PPOModule, {"gamma": 1.5}, r"gamma and lam must be in \[0, 1\]"),
    (PPOModule, {"sampling": {"max_new_tokens": 0}}, "max_new_tokens must be >= 1"),
    (DPOModule, {"beta": 0.0}, "beta must be > 0"),
    (DPOModule, {"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    (AgentModule, {"sampling": {"temperature": 0.0}}, "temperature must be > 0"),
    (RewardModule, {"center_coefficient": -1.0}, "center_coefficient must be >= 0"),
    (SFTModule, {"eval_max_new_tokens": 0}, "eval_max_new_tokens must be >= 1"),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_out_of_range_arguments_fail_before_any_model_is_built(module, arguments, message):
    models = {DistillModule: {"student": MISSING, "teacher": MISSING}, GRPOModule: {"policy": MISSING, "rewards": []},
              PPOModule: {"policy": MISSING, "rewards": []}, DPOModule: {"policy": MISSING},
              AgentModule: {"student": MISSING, "teacher": None}, RewardModule: {"model": MISSING},
              SFTModule: {"model": MISSING}}[module]
    with pytest.raises(ValueError, match=message):
        module(**models, **arguments)


def run_main(capsys, *args: str) -> tuple[int, str]:
    """``python -m lit_distill ARGS`` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def test_a_cli_mistake_is_one_message_with_exit_code_2_and_no_traceback(capsys, monkeypatch):
    code, err = run_main(capsys, "fit", "--config", GRPO, "--model.init_args.beta", "-0.5")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: beta must be >= 0 (the KL coefficient; 0 drops the reference), got -0.5\n")
    monkeypatch.setenv("LIT_DISTILL_DEBUG", "1")  # the switch: the exception itself, with its traceback
    with pytest.raises(ValueError, match="beta must be >= 0"):
        main(["fit", "--config", GRPO, "--model.init_args.beta", "-0.5"])


def test_a_sampling_mistake_names_its_field(capsys):
    with pytest.raises(ValueError, match=r"^sampling\.top_k must be >= 0"):
        Sampling(top_k=-1)
    code, err = run_main(capsys, "fit", "--config", GRPO, "--model.init_args.sampling.top_p", "0")
    assert code == 2 and err.startswith("error: sampling.top_p must be in (0, 1] (1 keeps every token), got 0.0\n")


def test_a_config_parse_error_keeps_only_the_alternative_that_failed(capsys):
    code, err = run_main(capsys, "fit", "--config", GRPO, "--model.init_args.betaa", "1")
    assert code == 2 and "Traceback" not in err
    assert ("error: Parser key \"model\": Problem with given class_path 'lit_distill.modules.GRPOModule': "
            "Option 'betaa' is not accepted") in err
    assert "NoneType" not in err and "Given value" not in err and "usage:" not in err


def test_a_byte_that_is_not_utf8_names_its_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9", "chosen": "b", '
                     b'"rejected": "c"}\n')
    with pytest.raises(DataFileError, match=r"pairs.jsonl:2: not UTF-8 text"):
        read_jsonl(path)


# ---- resuming and save_dir: nothing silently replaced ----------------------------------------------------------

SFT = str(ROOT / "configs/sft/quickstart.yaml")
SMALL = ["--model.init_args.model.config.hidden_size", "32", "--model.init_args.model.config.intermediate_size", "64",
         "--model.init_args.model.config.num_hidden_layers", "1", "--data.init_args.embedded_examples", "64",
         "--data.init_args.max_examples", "{validation: 8}", "--trainer.val_check_interval", "2",
         "--trainer.enable_checkpointing", "true"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step SFT run: its directory, with the checkpoint and the saved model."""
    directory = tmp_path_factory.mktemp("run")
    LitDistillCLI(args=["fit", "--config", SFT, *SMALL, "--trainer.max_steps", "2",
                        "--trainer.logger.init_args.save_dir", str(directory),
                        "--model.init_args.save_dir", str(directory / "model")])
    return directory


def checkpoint_of(run: Path) -> str:
    return str(next(run.rglob("*.ckpt")))


def resume(run: Path, tmp_path: Path, *extra: str):
    return LitDistillCLI(args=["fit", "--config", SFT, *SMALL, "--trainer.max_steps", "3", "--ckpt_path",
                               checkpoint_of(run), "--trainer.logger.init_args.save_dir", str(tmp_path),
                               "--model.init_args.save_dir", str(tmp_path / "model"), *extra])


def test_resuming_with_a_different_config_lists_every_difference_and_stops(finished_run, tmp_path):
    with pytest.raises(ValueError) as error:
        resume(finished_run, tmp_path, "--model.init_args.model.config.hidden_size", "48",
               "--data.init_args.max_length", "100", "--model.init_args.optimizer.init_args.lr", "0.5")
    assert "model.init_args.model.config.hidden_size: checkpoint 32, config 48" in str(error.value)
    # The optimizer is no hyperparameter of the module: compared from the config the CLI records in checkpoints.
    assert "model.init_args.optimizer.init_args.lr: checkpoint 0.003, config 0.5" in str(error.value)
    assert "data.init_args.max_length: checkpoint 128, config 100" in str(error.value)
    assert "--resume_config checkpoint" in str(error.value)


def test_resume_config_says_which_arguments_win(finished_run, tmp_path):
    cli = resume(finished_run, tmp_path / "config", "--data.init_args.max_length", "100", "--resume_config", "config")
    assert cli.datamodule.hparams.max_length == 100 and cli.trainer.global_step == 3
    # The checkpoint's arguments include its save_dir, which holds that run's model: refused unless overwritten.
    with pytest.raises(ValueError, match="save_dir .*run.*/model' already holds files"):
        resume(finished_run, tmp_path / "checkpoint", "--data.init_args.max_length", "100", "--resume_config",
               "checkpoint")


def test_resume_config_checkpoint_restores_its_data_and_optimizer_arguments(tmp_path):
    LitDistillCLI(args=["fit", "--config", SFT, *SMALL, "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir",
                        str(tmp_path / "first"), "--model.init_args.save_dir", str(tmp_path / "first" / "model")])
    cli = resume(tmp_path / "first", tmp_path / "second", "--data.init_args.max_length", "100",
                 "--model.init_args.optimizer.init_args.lr", "0.5", "--resume_config", "checkpoint",
                 "--overwrite_save_dir", "true")
    assert cli.datamodule.hparams.max_length == 128 and cli.trainer.global_step == 3
    assert cli.model.optimizers().optimizer.defaults["lr"] == 0.003


def test_a_checkpoint_of_another_module_or_no_checkpoint_is_one_clear_error(finished_run, tmp_path):
    with pytest.raises(ValueError, match="was written by lit_distill.modules.SFTModule, and this config trains "
                                         "lit_distill.modules.DistillModule"):
        LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--ckpt_path",
                            checkpoint_of(finished_run)])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="notes.ckpt' is not a Lightning checkpoint"):
        LitDistillCLI(args=["fit", "--config", SFT, "--ckpt_path", str(text)])


def test_fit_refuses_a_save_dir_that_holds_another_runs_model(finished_run, tmp_path):
    arguments = ["fit", "--config", SFT, *SMALL, "--trainer.max_steps", "1", "--trainer.logger.init_args.save_dir",
                 str(tmp_path), "--model.init_args.save_dir", str(finished_run / "model")]
    with pytest.raises(ValueError, match="already holds files .* --overwrite_save_dir true"):
        LitDistillCLI(args=arguments)
    assert LitDistillCLI(args=[*arguments, "--overwrite_save_dir", "true"]).trainer.global_step == 1


def test_a_run_without_a_logger_writes_no_config_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LitDistillCLI(args=["fit", "--config", SFT, *SMALL, "--trainer.max_steps", "1", "--trainer.logger", "false",
                              "--trainer.enable_checkpointing", "false", "--model.init_args.save_dir", "null"])
    assert cli.trainer.global_step == 1 and list(tmp_path.iterdir()) == []


def test_a_failed_run_leaves_no_empty_run_folder(tmp_path):
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from lit_distill.callbacks import RemoveEmptyRunFolder

    class FailsAt(L.LightningModule):
        def __init__(self, step: int):
            super().__init__()
            self.layer, self.fail_at = torch.nn.Linear(2, 1), step

        def training_step(self, batch, batch_idx):
            if batch_idx == self.fail_at:
                raise ValueError("a mistake found at this step")
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=2)

    for fail_at, kept in ((0, False), (5, True)):  # nothing logged: removed; metrics logged (not yet flushed): kept
        logger = CSVLogger(tmp_path, name=f"fails_at_{fail_at}")
        logger.log_hyperparams({"fail_at": fail_at})
        trainer = L.Trainer(max_steps=8, logger=logger, log_every_n_steps=2, enable_progress_bar=False,
                            enable_checkpointing=False, callbacks=[RemoveEmptyRunFolder()])
        with pytest.raises(ValueError, match="a mistake"):
            trainer.fit(FailsAt(fail_at))
        assert Path(logger.log_dir).exists() == kept


def test_prompts_cut_to_fit_are_counted_and_too_many_are_an_error(caplog):
    from lit_distill.data import SQuADPreferenceDataModule

    # DPO pairs whose prompts (a context and a question) do not fit 24 tokens: nearly all would train cut.
    short = SQuADPreferenceDataModule(embedded_examples=40, max_length=24, batch_size=4, max_examples={"validation": 4})
    with pytest.raises(ValueError, match=r"40 of 40 examples of the train split of source 'embedded' were truncated "
                                         r"to max_length=24, "
                                         r"more than max_truncated_fraction=0.5"):
        short.setup("fit")
    accepted = SQuADPreferenceDataModule(embedded_examples=40, max_length=24, batch_size=4,
                                         max_examples={"validation": 4}, max_truncated_fraction=1.0)
    with caplog.at_level("WARNING"):
        accepted.setup("fit")
    assert "were truncated to max_length=24" in caplog.text


def test_trainer_ranges_are_checked_before_anything_is_built():
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches must be >= 1, got 0"):
        LitDistillCLI(args=["fit", "--config", SFT, "--trainer.accumulate_grad_batches", "0"])


def test_export_from_a_folder_that_is_no_model_or_onto_a_file_is_one_clear_error(tmp_path):
    from lit_distill.export import EXPORT_ERRORS, export

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    with pytest.raises(EXPORT_ERRORS, match="is a directory without config.json, not a saved model"):
        export(str(notes), str(tmp_path / "out"), ["merged"])
    existing = tmp_path / "taken"
    existing.write_text("")
    with pytest.raises(EXPORT_ERRORS, match="--output '.*taken' is a file"):
        export("lit-distill/tiny-teacher", str(existing), ["merged"])


def test_data_arguments_are_checked_before_the_model_is_built():
    # The policy names no model: had it been built first, that would be the error.
    with pytest.raises(ValueError, match="embedded must be one of"):
        LitDistillCLI(args=["fit", "--config", str(ROOT / GRPO),
                            "--model.init_args.policy.name_or_path", "/nonexistent/model",
                            "--data.init_args.embedded", "nope"])


def _fit_without_a_model(config: str, *overrides: str) -> None:
    # The model names no weights: had it been built before the data were read, that would be the error.
    LitDistillCLI(args=["fit", "--config", str(ROOT / config), "--model.init_args.model.name_or_path",
                        "/nonexistent/model", *overrides])


def test_rows_of_the_users_data_are_checked_before_the_model_is_built(tmp_path):
    columns = tmp_path / "columns.jsonl"
    columns.write_text('{"question": "q", "reply": "r"}\n' * 4)
    with pytest.raises(ValueError, match=r"columns.jsonl' split 'train'.*\['question', 'reply'\]"):
        _fit_without_a_model("configs/sft/chat_quickstart.yaml", "--data.init_args.path", str(columns))
    messages = tmp_path / "messages.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    messages.write_text(good * 3 + '{"messages": [{"content": "no role"}]}\n' + good * 40)
    with pytest.raises(DataFileError, match=r"messages.jsonl' split 'train' row 3: .*'role'"):
        _fit_without_a_model("configs/sft/chat_quickstart.yaml", "--data.init_args.path", str(messages))


def test_a_malformed_line_of_a_prompt_file_is_reported_before_the_model_is_built(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1 plus 1 is"}\n{"prompt": \n')
    with pytest.raises(DataFileError, match=r"prompts.jsonl:2"):
        LitDistillCLI(args=["fit", "--config", GRPO, "--model.init_args.policy.name_or_path", "/nonexistent/model",
                            "--data.init_args.embedded", "null", "--data.init_args.path", str(prompts)])


@pytest.mark.parametrize("overrides, message", [
    (["--model.init_args.loss_type", "kto"], "loss_type 'kto' trains on unpaired rows: set data.init_args.unpaired"),
    (["--data.init_args.unpaired", "true"], "unpaired is true .* model.init_args.loss_type is 'sigmoid'")])
def test_kto_and_pair_data_that_do_not_match_fail_before_the_model_is_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/dpo/quickstart.yaml"),
                            "--model.init_args.policy.name_or_path", "/nonexistent/model",
                            "--model.init_args.precompute_reference", "false", *overrides])


def test_kto_on_paired_rows_of_the_users_file_fails_before_the_model_is_built(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "3 plus 4 is", "chosen": " 7", "rejected": " 8"}\n' * 20)
    with pytest.raises(ValueError, match="loss_type 'kto' trains on unpaired rows"):
        LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/dpo/preference.yaml"),
                            "--model.init_args.policy.name_or_path", "/nonexistent/model",
                            "--model.init_args.loss_type", "kto", "--model.init_args.precompute_reference", "false",
                            "--data.init_args.path", str(pairs)])


def test_a_reward_model_on_unpaired_rows_fails_before_the_model_is_built(tmp_path):
    rows = tmp_path / "unpaired.jsonl"
    rows.write_text('{"prompt": "3 plus 4 is", "completion": " 7", "label": true}\n' * 20)
    with pytest.raises(ValueError, match="RewardModule learns from preference pairs"):
        _fit_without_a_model("configs/reward/quickstart.yaml", "--data", "lit_distill.data.HFDataModule",
                             "--data.init_args.path", str(rows))
