"""LightningModule behaviour: what is optimised and saved, exact step normalisation, resume, loggers."""

import glob
import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import TOKENIZER, tiny_llama
from lit_distill.models.loading import ModelSpec
from lit_distill.modules import DistillModule, SFTModule
from lit_distill.rollout import Sampling

STUDENT = dict(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 4}, tokenizer=TOKENIZER)


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


class RaggedData(L.LightningDataModule):
    """Fixed examples whose loss masks differ a lot, so per-micro-batch means would weigh tokens unequally."""

    def __init__(self, batch_size: int, vocab_size: int, num_examples: int = 8, length: int = 12):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(5, vocab_size, (num_examples, length), generator=generator)
        labels = ids.clone()
        for row in range(num_examples):  # example i keeps only its last 1 + (7 * i) % 11 loss tokens
            labels[row, : length - 1 - (7 * row) % 11] = -100
        self.examples = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": l}
                         for i, l in zip(ids, labels)]
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.examples, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.examples, batch_size=4)


def fit(module, datamodule, **trainer_kwargs):
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, max_steps=1)
    settings.update(trainer_kwargs)
    trainer = L.Trainer(**settings)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def make_distill(llama_dir, **kwargs):
    torch.manual_seed(0)
    return DistillModule(student=ModelSpec(**STUDENT), teacher=ModelSpec(name_or_path=llama_dir), optimizer=sgd,
                         **kwargs)


def make_sft():
    torch.manual_seed(0)
    return SFTModule(model=ModelSpec(**STUDENT), optimizer=sgd)


@pytest.mark.parametrize("kind", ["sft", "distill"])
def test_grad_accumulation_4x1_equals_1x4_with_ragged_masks(kind, llama_dir, tokenizer):
    make = make_sft if kind == "sft" else (lambda: make_distill(llama_dir, alpha=0.3, temperature=2.0))
    data_full, data_micro = RaggedData(4, len(tokenizer)), RaggedData(1, len(tokenizer))
    counts = [int((e["labels"][1:] != -100).sum()) for e in data_micro.examples[:4]]
    assert len(set(counts)) == 4  # the micro-batches really hold different numbers of loss tokens

    one_batch, accumulated = make(), make()
    start = [p.detach().clone() for p in one_batch.model.parameters()]
    fit(one_batch, data_full)
    fit(accumulated, data_micro, accumulate_grad_batches=4)
    for before, a, b in zip(start, one_batch.model.parameters(), accumulated.model.parameters()):
        assert not torch.equal(before, a)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_teacher_is_frozen_in_eval_out_of_optimizer_and_checkpoint(llama_dir, tokenizer, tmp_path):
    module = make_distill(llama_dir)
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.model.parameters()}
    assert not optimised & {id(p) for p in module.teacher.parameters()}
    assert all(not p.requires_grad for p in module.teacher.parameters())
    module.train()
    assert module.model.training and not module.teacher.training

    trainer = fit(module, RaggedData(4, len(tokenizer)))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    state = torch.load(tmp_path / "run.ckpt", weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("teacher.")]
    restored = DistillModule.load_from_checkpoint(tmp_path / "run.ckpt")
    for a, b in zip(restored.model.parameters(), module.model.parameters()):
        torch.testing.assert_close(a, b)
    assert not restored.teacher.training


def test_vocab_mismatch_between_teacher_and_student_tokenizers(llama_dir, tokenizer, tmp_path):
    other = tokenizer.__class__.from_pretrained(llama_dir)
    other.add_tokens(["<|extra|>"])
    model = tiny_llama(len(other))
    model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab mismatch"):
        DistillModule(student=ModelSpec(**STUDENT), teacher=ModelSpec(name_or_path=str(tmp_path)))


def test_teacher_with_padded_vocab_is_aligned(tokenizer, tmp_path):
    padded = tiny_llama(len(tokenizer) + 64)  # embedding padded to a multiple, as big models do
    padded.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = DistillModule(student=ModelSpec(**STUDENT), teacher=ModelSpec(name_or_path=str(tmp_path)), optimizer=sgd)
    fit(module, RaggedData(4, len(tokenizer)))
    assert module.trainer.global_step == 1


def test_on_policy_batches_train_on_student_completions_only(llama_dir, tokenizer):
    module = make_distill(llama_dir, on_policy_fraction=1.0, prompt_tokens=4, sampling=Sampling(max_new_tokens=6))
    batch = RaggedData(2, len(tokenizer)).examples
    batch = {k: torch.stack([e[k] for e in batch[:2]]) for k in batch[0]}
    completed = module.student_completions(batch)
    prompt_part = completed["input_ids"][:, :4]
    assert torch.equal(prompt_part, batch["input_ids"][:, :4])
    assert (completed["labels"][:, :4] == -100).all() and (completed["labels"][:, 4:] != -100).any()
    fit(module, RaggedData(2, len(tokenizer)), max_steps=2, log_every_n_steps=1)
    assert module.trainer.callback_metrics["kd/on_policy"] == 1.0


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def test_resume_from_last_checkpoint_continues_with_the_same_next_loss(tmp_path, tokenizer):
    from lit_distill.data import WikiTextDataModule

    def run(max_epochs, ckpt_path=None, root="a"):
        torch.manual_seed(0)
        recorder = LossRecorder()
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / root / "ckpt", save_last=True)
        trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, callbacks=[recorder, checkpoint],
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            log_every_n_steps=1, default_root_dir=tmp_path / root)
        data = WikiTextDataModule(source="embedded", embedded_documents=40, block_size=32, batch_size=8)
        module = SFTModule(model=ModelSpec(**STUDENT), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return recorder.losses

    uninterrupted = run(max_epochs=2, root="full")
    first_epoch = run(max_epochs=1)
    resumed = run(max_epochs=2, ckpt_path=str(tmp_path / "a" / "ckpt" / "last.ckpt"))
    assert len(first_epoch) + len(resumed) == len(uninterrupted)
    assert resumed[0] == pytest.approx(uninterrupted[len(first_epoch)], rel=1e-5)
    assert resumed == pytest.approx(uninterrupted[len(first_epoch):], rel=1e-4)


@pytest.mark.parametrize("logger", ["wandb", "tensorboard", "csv"])
def test_loggers_write_offline(logger, tmp_path, tokenizer):
    from lightning.pytorch import loggers

    make = {"wandb": lambda: loggers.WandbLogger(save_dir=str(tmp_path), offline=True, project="t"),
            "tensorboard": lambda: loggers.TensorBoardLogger(save_dir=str(tmp_path)),
            "csv": lambda: loggers.CSVLogger(save_dir=str(tmp_path))}[logger]
    fit(make_sft(), RaggedData(4, len(tokenizer)), logger=make(), max_steps=2, log_every_n_steps=1)
    if logger == "wandb":
        import wandb

        wandb.finish()
    pattern = {"wandb": "wandb/offline-run-*/run-*.wandb", "tensorboard": "lightning_logs/*/events.out.tfevents.*",
               "csv": "lightning_logs/*/metrics.csv"}[logger]
    assert glob.glob(os.path.join(tmp_path, pattern))
