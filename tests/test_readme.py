"""README.md's code blocks: every command block that finishes within a minute runs verbatim, every other one is
listed below with why it does not, and every config snippet parses where it says it goes (so no block can name an
option, a path or a command that no longer exists without a test failing)."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from lit_distill.cli import LitDistillCLI

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def readme_blocks(language: str) -> list[str]:
    return [text for kind, text in FENCE.findall((REPO / "README.md").read_text()) if kind == language]


# Command blocks that run here, by a line they contain: what each needs beforehand (made by a fixture).
RUN = {
    "python -m lit_distill export runs/quickstart/student": "the quickstart's student (quickstart_run)",
    "python -m lit_distill fit --config configs/grpo/self_distill.yaml": "nothing (10 LoRA steps and the export)",
}
# The others, by a line they contain, and why they do not run here.
NOT_RUN = {
    "pip install -e . && python -m lit_distill fit": "the fresh-machine set-up and quickstart (~4 min): CI's own run",
    "pip install -e '.[test]' && python -m pytest": "the set-up and this test suite itself",
    "python -m lit_distill cache-teacher --config configs/quickstart.yaml": "a teacher pass and a fit (~3 min)",
    "python -m lit_distill write-data --model smollm2-135m-instruct": "SmolLM2 writes 192 tokens per prompt (minutes)",
    "python -m lit_distill bench reward dpo kd_off_policy": "benchmarks, TRL from the bench extra (tens of minutes)",
    "python bin/distill_comparison.py": "the SmolLM2 comparison (hours)",
}
# Config snippets, by a line they contain: the config they extend and where in it the snippet goes.
SNIPPETS = {
    "name_or_path: gpt2": ("configs/quickstart.yaml", ["model", "init_args"]),
    "class_path: lit_distill.rewards.ArithmeticReward": ("configs/grpo/quickstart.yaml", ["model", "init_args"]),
    "logit_cache:": ("configs/quickstart.yaml", []),
    "class_path: lit_distill.teachers.HTTPTeacher": ("configs/agent/quickstart.yaml", ["model", "init_args"]),
    "class_path: lit_distill.data.CurriculumDataModule": ("configs/curriculum/quickstart.yaml", []),
}


def classify(block: str, table: dict) -> list[str]:
    return [key for key in table if key in block]


def test_every_block_is_run_or_listed_with_why_not():
    for block in readme_blocks("bash"):
        assert len(classify(block, RUN)) + len(classify(block, NOT_RUN)) == 1, block
    for block in readme_blocks("yaml"):
        assert len(classify(block, SNIPPETS)) == 1, block
    # every entry still matches a block: a stale one would excuse nothing
    blocks = readme_blocks("bash") + readme_blocks("yaml")
    assert all(any(key in block for block in blocks) for key in (*RUN, *NOT_RUN, *SNIPPETS))


def test_quick_command_blocks_run_verbatim(quickstart_run):
    """Run in the quickstart's folder (holding ``runs/quickstart``) with the repository's configs beside it."""
    (quickstart_run / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}", "CI": "true"}
    for block in (block for block in readme_blocks("bash") if classify(block, RUN)):
        result = subprocess.run(["bash", "-e", "-c", block], cwd=quickstart_run, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, f"{block}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    export = quickstart_run / "runs/quickstart/export"
    assert (export / "merged/config.json").is_file()
    assert {path.name for path in (export / "gguf").glob("*.gguf")} == {"model-f16.gguf", "model-q8_0.gguf"}
    lora = quickstart_run / "runs/grpo_self_distill/export"
    assert (lora / "adapter/adapter_config.json").is_file() and (lora / "merged/config.json").is_file()
    assert [path.name for path in (lora / "gguf").glob("*.gguf")] == ["model-f16.gguf"]


def nest(snippet: dict, path: list[str]) -> dict:
    for key in reversed(path):
        snippet = {key: snippet}
    return snippet


def leaf_keys(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {key for child in value.values() for key in leaf_keys(child)}
    if isinstance(value, list):
        return {key for child in value for key in leaf_keys(child)}
    return set()


@pytest.mark.parametrize("line", SNIPPETS)
def test_config_snippets_parse_where_they_go(line, tmp_path, capsys):
    block = next(block for block in readme_blocks("yaml") if line in block)
    base, path = SNIPPETS[line]
    overlay = tmp_path / "snippet.yaml"
    overlay.write_text(yaml.safe_dump(nest(yaml.safe_load(block), path)))
    with pytest.raises(SystemExit) as exit_info:
        LitDistillCLI(args=["fit", "--config", str(REPO / base), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert all(f"{key}:" in printed for key in leaf_keys(yaml.safe_load(block))), printed
