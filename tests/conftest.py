"""Shared fixtures: tiny models saved to local directories, so hub code paths run offline."""

import os
import tempfile

# Encoded datasets go to a scratch cache, not the user's (every session starts from an empty one).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="lit_distill_datasets_"))
# Nothing in the test suite may reach the network or a tracking server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lit_distill.models.loading import load_tokenizer
from lit_distill.rollout import position_ids_from_mask

TOKENIZER = "lit-distill/tokenizer"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def finish_wandb_runs():
    """A test that fails mid-fit leaves its wandb run active, and the next WandbLogger would log into it."""
    yield
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def tiny_llama(vocab_size: int, layers: int = 2, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int, layers: int = 2, hidden: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256))


def greedy_reference(model, input_ids, attention_mask, steps):
    """Greedy decoding without a KV cache (a full forward per step), ignoring EOS: (B, steps) tokens."""
    prompt_length = input_ids.size(1)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask)).logits[:, -1]
            input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], dim=1)
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
    return input_ids[:, prompt_length:]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch limited to one intra-op thread for a test module (restored after it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    """A 2-layer random Llama with the shipped tokenizer, as a save_pretrained directory (a 'teacher')."""
    return _save(tiny_llama(len(tokenizer), layers=2, hidden=48, seed=1), tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2_dirs(tmp_path_factory, tokenizer):
    """Teacher and student GPT-2 directories standing in for gpt2-medium and gpt2."""
    return (_save(tiny_gpt2(len(tokenizer), layers=3, hidden=48, seed=2), tokenizer, tmp_path_factory.mktemp("gpt2m")),
            _save(tiny_gpt2(len(tokenizer), layers=2, hidden=32, seed=3), tokenizer, tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """A shortened ``configs/quickstart.yaml`` fit (60 steps), laid out as README's commands expect it: the folder
    holding ``runs/quickstart/version_0`` and the student in ``runs/quickstart/student``."""
    from lit_distill.cli import LitDistillCLI

    root = tmp_path_factory.mktemp("quickstart")
    LitDistillCLI(args=["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--trainer.max_steps", "60",
                        "--trainer.val_check_interval", "60", "--data.init_args.embedded_documents", "600",
                        "--trainer.logger.init_args.save_dir", str(root / "runs"),
                        "--model.init_args.save_dir", str(root / "runs/quickstart/student")])
    return root
