"""The teacher-logit cache: what it stores equals the teacher, training from it equals the live loss where it
must, it resumes after a crash, and every bad input is one clear error before any model loads."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from lit_distill.cli import main
from lit_distill.data import WikiTextDataModule
from lit_distill.models.loading import ModelSpec, build_model, load_tokenizer
from lit_distill.modules import DistillModule
from lit_distill.teachers import logit_cache
from lit_distill.teachers.logit_cache import (LogitCache, LogitCacheError, LogitCacheSpec, build_logit_cache,
                                              expected_manifest, shard_file, teacher_topk)
from test_cli import run_cli
from test_modules import STUDENT, RaggedData, fit, sgd

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ModelSpec(name_or_path="lit-distill/tiny-teacher")
QUICK_STUDENT = ModelSpec(tokenizer="lit-distill/tiny-teacher", config={
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 4})


def datamodule(block_size=32, batch_size=8):
    return WikiTextDataModule(source="embedded", tokenizer="lit-distill/tiny-teacher", embedded_documents=60,
                              block_size=block_size, batch_size=batch_size, max_blocks={"validation": 8})


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_tokenizer("lit-distill/tiny-teacher")


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer):
    return build_model(TEACHER, tiny_tokenizer).eval()


def build(path, tokenizer, top_k=16, temperature=1.0, data=None, **spec):
    spec = LogitCacheSpec(path=str(path), top_k=top_k, shard_examples=spec.pop("shard_examples", 40), **spec)
    data = data or datamodule()
    build_logit_cache(spec, TEACHER, tokenizer, data, temperature, progress=False)
    return spec, data


def open_cache(spec, tokenizer, data, temperature=1.0, teacher=TEACHER):
    return LogitCache(spec.path, expected_manifest(spec, teacher, tokenizer, temperature, data))


def test_lookup_returns_the_teachers_values_for_shuffled_differently_padded_batches(tmp_path, tiny_tokenizer,
                                                                                  teacher):
    spec, data = build(tmp_path / "cache", tiny_tokenizer, temperature=2.0)
    cache = open_cache(spec, tiny_tokenizer, data, temperature=2.0)
    assert len(cache) == len(data.datasets["train"]) + len(data.datasets["validation"])
    batch = next(iter(data.train_dataloader()))  # shuffled: not the build's batches
    # Left-pad by 3 tokens, the first real token's label ignored as a left-padding collator does (no position
    # predicts it): the content key and the loss positions move with the padding.
    pad = lambda t, value: torch.cat([torch.full((t.shape[0], 3), value, dtype=t.dtype), t], dim=1)  # noqa: E731
    labels = batch["labels"].clone()
    labels[:, 0] = -100
    padded = {"input_ids": pad(batch["input_ids"], tiny_tokenizer.pad_token_id),
              "attention_mask": pad(batch["attention_mask"], 0), "labels": pad(labels, -100)}
    cached = cache.lookup(padded)
    live = teacher_topk(teacher, padded, top_k=16, temperature=2.0, vocab_size=len(tiny_tokenizer))
    positions = padded["labels"][:, 1:] != -100
    assert positions[:, :3].sum() == 0 and cached.topk_ids.shape == (*positions.shape, 16)
    assert torch.equal(cached.topk_ids[positions], live["topk_ids"])
    assert_close(cached.topk_logprobs[positions], live["topk_logprobs"].float(), rtol=0, atol=0)
    assert_close(cached.tail_logprob[positions], live["tail_logprob"], rtol=1e-5, atol=1e-5)
    assert_close(cached.label_logprob[positions], live["label_logprob"], rtol=1e-5, atol=1e-5)
    # The label log-prob is the teacher's at temperature 1, whatever the cache's temperature.
    logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    reference = torch.log_softmax(logits, -1).gather(-1, batch["labels"][:, 1:, None]).squeeze(-1)
    assert_close(cached.label_logprob[:, 3:], reference, rtol=1e-4, atol=1e-4)


def test_distill_module_from_a_full_vocabulary_cache_gives_the_live_loss(tmp_path, tiny_tokenizer):
    spec, data = build(tmp_path / "cache", tiny_tokenizer, top_k=len(tiny_tokenizer))
    live = DistillModule(QUICK_STUDENT, TEACHER, alpha=0.3)
    cached = DistillModule(QUICK_STUDENT, TEACHER, alpha=0.3, logit_cache=spec)
    assert cached.teacher is None
    cached.model.load_state_dict(live.model.state_dict())
    cached.logit_cache = open_cache(spec, tiny_tokenizer, data)
    batch = next(iter(data.val_dataloader()))
    _, live_teacher_lp, live_loss, live_stats = live.distill_loss(batch, alpha=0.3, with_teacher_label_logprobs=True)
    _, cached_teacher_lp, cached_loss, cached_stats = cached.distill_loss(batch, alpha=0.3,
                                                                          with_teacher_label_logprobs=True)
    assert_close(cached_loss, live_loss, rtol=1e-3, atol=0)  # the stored log-probs are fp16
    assert_close(cached_stats.ce, live_stats.ce, rtol=1e-6, atol=0)
    assert_close(cached_teacher_lp, live_teacher_lp, rtol=1e-5, atol=1e-5)
    assert live.evaluate(data.val_dataloader())["teacher_ppl"] == pytest.approx(
        cached.evaluate(data.val_dataloader())["teacher_ppl"], rel=1e-5)


def test_build_resumes_after_a_crash_and_equals_an_uninterrupted_build(tmp_path, tiny_tokenizer, monkeypatch):
    whole, _ = build(tmp_path / "whole", tiny_tokenizer)
    files = sorted(p.relative_to(whole.path) for p in Path(whole.path).rglob("*.safetensors"))
    assert len(files) >= 3  # train in several shards + validation

    written = []
    real_write = logit_cache._write_shard

    def dies_after_one(file, tensors, metadata):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(file)
        real_write(file, tensors, metadata)

    monkeypatch.setattr(logit_cache, "_write_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resumed", tiny_tokenizer)
    # What a kill -9 in the middle of a write leaves: a temporary file, never read.
    (Path(whole.path).parent / "resumed" / "train" / "shard-00001.safetensors.tmp-999").write_bytes(b"half")
    monkeypatch.setattr(logit_cache, "_write_shard", lambda *args: (written.append(args[0]), real_write(*args)))
    build(tmp_path / "resumed", tiny_tokenizer)
    assert len(written) == len(files)  # the first shard was not written again
    for name in files:  # (not byte-compared: safetensors orders the header's metadata keys arbitrarily)
        resumed, uninterrupted = (safe_open(str(root / name), framework="pt")
                                  for root in (tmp_path / "resumed", Path(whole.path)))
        assert resumed.metadata() == uninterrupted.metadata() and resumed.keys() == uninterrupted.keys()
        for tensor in resumed.keys():
            assert torch.equal(resumed.get_tensor(tensor), uninterrupted.get_tensor(tensor)), (name, tensor)


@pytest.mark.parametrize("change, field", [
    (dict(top_k=8), "top_k"), (dict(temperature=2.0), "temperature"),
    (dict(teacher=ModelSpec(name_or_path="lit-distill/tiny-teacher", dtype="float64")), "teacher"),
    (dict(data=datamodule(block_size=24)), "data: split 'train' differs")])
def test_a_cache_of_other_inputs_is_refused_before_any_model_loads(tmp_path, tiny_tokenizer, monkeypatch, change,
                                                                   field):
    spec, data = build(tmp_path / "cache", tiny_tokenizer)
    before = sorted(Path(spec.path).rglob("*"))
    monkeypatch.setattr(logit_cache, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    rebuilt = LogitCacheSpec(path=spec.path, top_k=change.get("top_k", 16), shard_examples=40)
    with pytest.raises(LogitCacheError, match=field) as error:
        build_logit_cache(rebuilt, change.get("teacher", TEACHER), tiny_tokenizer, change.get("data", data),
                          change.get("temperature", 1.0), progress=False)
    assert spec.path in str(error.value) and "delete" in str(error.value)
    assert sorted(Path(spec.path).rglob("*")) == before  # nothing written or removed


def test_damaged_missing_and_foreign_shards_are_clear_errors(tmp_path, tiny_tokenizer):
    spec, data = build(tmp_path / "cache", tiny_tokenizer)
    shard = shard_file(Path(spec.path), "train", 1)
    content = shard.read_bytes()
    shard.write_bytes(content[: len(content) // 2])
    with pytest.raises(LogitCacheError, match=r"shard-00001.safetensors: damaged shard"):
        open_cache(spec, tiny_tokenizer, data)
    shard.unlink()
    with pytest.raises(LogitCacheError, match="incomplete: 1 shard"):
        open_cache(spec, tiny_tokenizer, data)
    other, _ = build(tmp_path / "other", tiny_tokenizer, temperature=3.0)
    shard.write_bytes(shard_file(Path(other.path), "train", 1).read_bytes())
    with pytest.raises(LogitCacheError, match="belongs to another cache"):
        open_cache(spec, tiny_tokenizer, data)
    (Path(spec.path) / "cache.json").write_text("{not json")
    with pytest.raises(LogitCacheError, match="cache.json: not a teacher-cache manifest"):
        open_cache(spec, tiny_tokenizer, data)


def test_an_example_that_is_not_in_the_cache_is_a_clear_error(tmp_path, tiny_tokenizer):
    spec, data = build(tmp_path / "cache", tiny_tokenizer, splits=["validation"])
    cache = open_cache(spec, tiny_tokenizer, data)
    batch = next(iter(data.val_dataloader()))
    cache.lookup(batch)
    batch["input_ids"][2, 5] += 1
    with pytest.raises(LogitCacheError, match="batch row 2 is not in teacher cache"):
        cache.lookup(batch)


def test_on_policy_mixing_with_a_cache_is_refused():
    with pytest.raises(ValueError, match="on_policy_fraction > 0 needs the live teacher"):
        DistillModule(QUICK_STUDENT, TEACHER, on_policy_fraction=0.5, logit_cache=LogitCacheSpec(path="unused"))


class RaggedEncodedData(RaggedData):
    """RaggedData with the ``datasets``/``collate_fn`` a logit cache is built from."""

    def __init__(self, batch_size, vocab_size):
        super().__init__(batch_size, vocab_size)
        self.datasets = {"train": self.examples}

    def collate_fn(self, split):
        return None


def test_grad_accumulation_4x1_equals_1x4_from_the_cache(tmp_path, llama_dir):
    vocab = len(load_tokenizer(llama_dir))
    spec = LogitCacheSpec(path=str(tmp_path / "cache"), top_k=8, splits=["train"])

    def make():
        torch.manual_seed(0)
        return DistillModule(ModelSpec(**STUDENT), ModelSpec(name_or_path=llama_dir), alpha=0.3, temperature=2.0,
                             optimizer=sgd, logit_cache=spec)

    one_batch, accumulated = make(), make()
    start = [p.detach().clone() for p in one_batch.model.parameters()]
    fit(one_batch, RaggedEncodedData(4, vocab))  # builds the cache
    fit(accumulated, RaggedEncodedData(1, vocab), accumulate_grad_batches=4)
    for before, a, b in zip(start, one_batch.model.parameters(), accumulated.model.parameters()):
        assert not torch.equal(before, a)
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cache_teacher_command_then_fit_from_the_cache(tmp_path, capsys):
    configs = ["--config", str(ROOT / "configs/quickstart.yaml"), "--config",
               str(ROOT / "configs/distill/cache_quickstart.yaml")]
    short = ["--data.init_args.embedded_documents", "60", "--data.init_args.block_size", "32",
             "--data.init_args.max_blocks", "{validation: 8}"]
    main(["cache-teacher", *configs, *short, "--output", str(tmp_path / "cache")])
    assert "teacher cache" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert manifest["top_k"] == 64 and manifest["teacher"]["name_or_path"] == "lit-distill/tiny-teacher"
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")}
    main(["fit", *configs, *short, "--model.init_args.logit_cache.path", str(tmp_path / "cache"),
          "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
          "--model.init_args.save_dir", str(tmp_path / "student")])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")} == stamps  # reused
    report = json.loads(next((tmp_path / "logs").rglob("distill_report.json")).read_text())
    assert report["student_ppl_after"] < report["student_ppl_before"]
    assert 1 < report["teacher_ppl_after"] < 10  # the tiny teacher's perplexity, read from the cache
    assert (tmp_path / "student" / "model.safetensors").exists()


def test_help_lists_the_cache_teacher_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "cache-teacher       cache a DistillModule config's teacher top-k log-probs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["cache-teacher", "--help"])
    assert "--output" in capsys.readouterr().out


def test_cache_teacher_needs_a_cache_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a user error: one message, exit code 2
        main(["cache-teacher", "--config", str(ROOT / "configs/quickstart.yaml")])
    assert exit_info.value.code == 2 and "error: the config has no model.init_args.logit_cache" in capsys.readouterr().err


def test_ddp_two_processes_from_the_cache_match_one_process(llama_dir, tmp_path):
    """2 ranks × 4 vs 1 × 8 from one cache (built by the 2-rank run, its shards shared between the ranks)."""
    common = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config",
              str(ROOT / "configs/distill/cache_quickstart.yaml"),
              "--model.init_args.teacher.name_or_path", llama_dir, "--model.init_args.student.tokenizer", llama_dir,
              "--data.init_args.tokenizer", llama_dir, "--data.init_args.embedded_documents", "200",
              "--data.init_args.block_size", "32", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--model.init_args.logit_cache.path", str(tmp_path / "cache"),
              "--model.init_args.logit_cache.top_k", "8", "--model.init_args.logit_cache.shard_examples", "16"]
    run_cli(common + ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.batch_size", "4",
                      "--model.init_args.save_dir", str(tmp_path / "ddp")], cwd=tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")}
    assert len(stamps) > 2
    run_cli(common + ["--trainer.devices", "1", "--data.init_args.batch_size", "8",
                      "--model.init_args.save_dir", str(tmp_path / "single")], cwd=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")} == stamps
    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").state_dict()
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    for name in ddp:
        assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
