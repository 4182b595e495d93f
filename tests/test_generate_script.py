"""python -m lit_distill generate: saved directories and Lightning checkpoints, prompt files, batching, errors."""

import glob
import importlib
import json

import lightning as L
import pytest
import torch

from conftest import TOKENIZER
from lit_distill.data import WikiTextDataModule
from lit_distill.models.loading import ModelSpec, build_model
from lit_distill.modules import SFTModule
from lit_distill.rollout import generate
from lit_distill.rollout.sampling import left_pad

PROMPTS = ["Anna lives in", "The quick brown fox jumps over the lazy", "Hello"]


@pytest.fixture(scope="module")
def script():
    return importlib.import_module("lit_distill.commands.generate")


def direct_greedy(model, tokenizer, prompts, max_new_tokens):
    """Our ``generate`` on all prompts in one left-padded batch, decoded like the script."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    input_ids, attention_mask = left_pad(ids, tokenizer.pad_token_id)
    rollout = generate(model.eval(), input_ids, attention_mask, max_new_tokens=max_new_tokens,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return [tokenizer.decode(t[m.bool()], skip_special_tokens=True)
            for t, m in zip(rollout.completions, rollout.completion_mask)]


def run(script, argv, capsys):
    rows = script.main(argv)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows
    return rows


def prompt_args(prompts):
    return [arg for prompt in prompts for arg in ("--prompt", prompt)]


def test_greedy_matches_generate_and_batch_size(script, llama_dir, tokenizer, capsys):
    model = build_model(ModelSpec(name_or_path=llama_dir), tokenizer)
    expected = direct_greedy(model, tokenizer, PROMPTS, 12)
    assert any(expected)
    for batch_size in ("1", "3", "2"):
        rows = run(script, [llama_dir, *prompt_args(PROMPTS), "--max-new-tokens", "12", "--batch-size", batch_size],
                   capsys)
        assert rows == [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, expected)]


def test_prompts_files_and_output(script, llama_dir, tmp_path, capsys):
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("\n".join(PROMPTS[1:]) + "\n\n")
    jsonl_file = tmp_path / "prompts.jsonl"
    jsonl_file.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS[1:])))
    reference = run(script, [llama_dir, *prompt_args(PROMPTS), "--max-new-tokens", "6"], capsys)
    for file in (text_file, jsonl_file):
        rows = run(script, [llama_dir, "--prompt", PROMPTS[0], "--prompts-file", str(file), "--max-new-tokens", "6"],
                   capsys)
        assert rows == reference
    out = tmp_path / "out" / "completions.jsonl"
    script.main([llama_dir, "--prompts-file", str(jsonl_file), "--max-new-tokens", "6", "--output", str(out)])
    assert capsys.readouterr().out == ""
    assert [json.loads(line) for line in out.read_text().splitlines()] == reference[1:]


def test_sampling_is_seeded_and_chat_template(script, llama_dir, capsys):
    args = [llama_dir, *prompt_args(PROMPTS), "--max-new-tokens", "8", "--sample", "--temperature", "1.5",
            "--top-k", "50", "--top-p", "0.95"]
    first = run(script, args + ["--seed", "3"], capsys)
    assert run(script, args + ["--seed", "3"], capsys) == first
    rows = run(script, [llama_dir, "--prompt", PROMPTS[0], "--chat-template", "default", "--max-new-tokens", "4"],
               capsys)
    assert rows[0]["prompt"] == PROMPTS[0]


def test_lightning_checkpoint(script, tmp_path, capsys):
    spec = ModelSpec(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 4}, tokenizer=TOKENIZER)
    torch.manual_seed(0)
    module = SFTModule(model=spec, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=WikiTextDataModule(source="embedded", embedded_documents=20, block_size=32,
                                                      batch_size=4))
    (checkpoint,) = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    expected = direct_greedy(module.model, module.tokenizer, PROMPTS, 8)
    rows = run(script, [checkpoint, *prompt_args(PROMPTS), "--max-new-tokens", "8", "--batch-size", "2"], capsys)
    assert [row["completion"] for row in rows] == expected


def test_errors(script, llama_dir, tmp_path):
    with pytest.raises(script.GenerateError, match="does not exist"):
        script.main([str(tmp_path / "missing"), "--prompt", "hi"])
    with pytest.raises(script.GenerateError, match="does not exist"):
        script.main([str(tmp_path / "missing.ckpt"), "--prompt", "hi"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(script.GenerateError, match="no prompts"):
        script.main([llama_dir, "--prompts-file", str(empty)])
    with pytest.raises(script.GenerateError, match="does not exist"):
        script.main([llama_dir, "--prompts-file", str(tmp_path / "nope.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(script.GenerateError, match="prompt"):
        script.main([llama_dir, "--prompts-file", str(bad)])
    with pytest.raises(SystemExit):  # argparse: no prompts at all
        script.main([llama_dir])


def test_stop_strings_end_completions(script, llama_dir, capsys):
    free = script.main([llama_dir, "--prompt", "Anna lives in", "--max-new-tokens", "12"])[0]["completion"]
    assert len(free) > 2
    stop = free[1:3]  # two characters the greedy completion produces early
    stopped = script.main([llama_dir, "--prompt", "Anna lives in", "--max-new-tokens", "12", "--stop", stop])
    completion = stopped[0]["completion"]
    assert stop in completion and free.startswith(completion) and len(completion) < len(free)
