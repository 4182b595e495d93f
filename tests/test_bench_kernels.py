"""The kernel-level benchmarks (kd_memory, sampling, mfu) and the one-command CLI: each measures what it says, and
the two sides of each comparison do the same work (same tokens, same losses)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_distill.bench import __main__ as cli
from lit_distill.bench import kd_memory, mfu, sampling, timing
from lit_distill.bench.workload import Options, build


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    timing.quiet()
    return build(tmp_path_factory.mktemp("bench_kernels"), num_rows=48)


def test_kd_memory_row_holds_the_gradient_and_matches_unchunked():
    settings = kd_memory.Settings(chunk_sizes=(16,), vocab_size=4096, seq_len=64, batch_size=2)  # 2 MiB logits
    result = kd_memory.measure(None, Options(), settings, rounds=1)
    (row,) = result["rows"]
    assert row["chunk_size"] == 16 and math.isfinite(row["loss"]) and row["time_s"] > 0
    assert row["loss_diff"] < 1e-5 and row["grad_diff"] < 1e-6
    # The student-logit gradient (one logits-sized tensor) is allocated during the pass: the peak must show it.
    assert result["logits_mib"] == pytest.approx(2.0)
    assert row["peak_extra_mib"] >= 0.9 * result["logits_mib"]
    assert "chunk size" in kd_memory.table(result)


def test_sampling_engines_agree_on_greedy_tokens(workload, one_torch_thread):
    settings = sampling.Settings(batch_size=4, new_tokens=8, modes=("greedy", "sampled"))
    result = sampling.measure(workload, Options(), settings, rounds=1)
    greedy, sampled = result["rows"]
    assert (greedy["mode"], sampled["mode"]) == ("greedy", "sampled")
    for row in result["rows"]:
        assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["ratio"] > 0
    assert greedy["same_rows"] == 1.0  # same model, same left-padded prompts, argmax: the same completions
    assert "| greedy |" in sampling.table(result)


def test_sampling_counts_completion_tokens_up_to_eos():
    completions = torch.tensor([[5, 9, 1, 9], [5, 5, 5, 5]])
    assert sampling.completion_tokens(completions, eos=[9]) == 2 + 4
    assert sampling.completion_tokens(completions, eos=[]) == 8


def test_mfu_naive_loop_and_distill_module_take_the_same_steps(workload, one_torch_thread):
    options = Options(steps=1, warmup=1)
    settings = mfu.Settings(batch_size=2, seq_len=16, peak_sizes=(256,), peak_min_run_time=0.05)
    result = mfu.measure(workload, options, settings, rounds=1)
    naive, ours = result["rows"]
    assert (naive["loop"], ours["loop"]) == ("naive", "lit_distill")
    assert (result["alpha"], result["temperature"]) == (0.5, 1.0)  # DistillModule's defaults
    # Same weights, same batch, same loss definition: the same first loss; and the same update (clipping, AdamW):
    # the same second loss.
    assert result["first_loss_diff"] < 1e-5 and naive["first_loss"] > 0
    assert result["max_loss_diff"] < 1e-5  # an update at lr 1e-4 moves it by ~2e-2
    assert result["peak"]["gflops"] > 0
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["gflops"] > 0 and 0 < row["mfu"] < 1.5
    assert result["ratio"] > 0 and "DistillModule / naive" in mfu.table(result)


def test_mfu_counts_the_lm_head_even_when_tied():
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    layer = 4 * 16 * 16 + 3 * 16 * 32  # q, k, v, o + gate, up, down
    assert mfu.matmul_parameters(model) == layer + 100 * 16  # the head's matmul, though its weight is the embedding
    assert sum(p.numel() for p in model.parameters()) == layer + 100 * 16 + 3 * 16  # + the norms, embedding once


def test_cli_rejects_an_unknown_measurement(capsys):
    with pytest.raises(SystemExit):
        cli.main(["mfu", "throughput"])
    assert "unknown measurement(s) throughput" in capsys.readouterr().err


def test_cli_refuses_an_existing_json_file(tmp_path, capsys):
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit):
        cli.main(["kd_memory", "--json", str(existing)])
    assert "exists" in capsys.readouterr().err and existing.read_text() == "{}"


def test_cli_defaults_to_training_loops_sampling_and_mfu():
    args = cli.parse_args([], list(cli.measurements()))
    assert args.names == ["reward", "dpo", "kd_off_policy", "kd_on_policy", "grpo", "sampling", "mfu"]
    args = cli.parse_args(["kd_memory", "--kd-memory-chunk-sizes", "none,64"], list(cli.measurements()))
    assert cli.kernel_settings(args, "kd_memory").chunk_sizes == (None, 64)
