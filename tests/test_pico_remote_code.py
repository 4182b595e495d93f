"""A saved pico model loads with plain transformers (``trust_remote_code=True``) where lit_distill is not importable:
``save_pretrained`` writes ``auto_map`` and copies the model's code next to the weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_distill.models.pico import (PicoKGramConfig, PicoKGramForCausalLM, PicoLSTMConfig, PicoLSTMForCausalLM,
                                     PicoTransformerConfig, PicoTransformerForCausalLM)
from lit_distill.rollout import left_pad

VOCAB = 50
MODELS = {  # model type -> (model, the module file save_pretrained copies besides common.py)
    "pico_transformer": (lambda: PicoTransformerForCausalLM(PicoTransformerConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.1)), "transformer.py"),
    "pico_lstm": (lambda: PicoLSTMForCausalLM(PicoLSTMConfig(vocab_size=VOCAB, hidden_size=32,
                                                            initializer_range=0.3)), "lstm.py"),
    "pico_kgram": (lambda: PicoKGramForCausalLM(PicoKGramConfig(vocab_size=VOCAB, context_size=3, hidden_size=32,
                                                               initializer_range=0.2)), "kgram.py"),
}
# Run in a fresh interpreter, from a directory without the repository: lit_distill cannot be imported there.
LOAD_WITHOUT_LIT_DISTILL = """
import sys
sys.modules["lit_distill"] = None  # `import lit_distill` (and of its submodules) now raises ImportError
import torch
from transformers import AutoModelForCausalLM
inputs = torch.load("inputs.pt")
results = {}
for name in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
    with torch.no_grad():
        results[name] = {"module": type(model).__module__, "logits": model(**inputs).logits}
torch.save(results, "results.pt")
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The models saved to <tmp>/<model type>, their logits on a left-padded batch, and what a process without
    lit_distill computed from the saved directories."""
    root = tmp_path_factory.mktemp("pico_remote_code")
    input_ids, attention_mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 0)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    torch.save(inputs, root / "inputs.pt")
    models, expected = {}, {}
    for name, (make, _) in MODELS.items():
        torch.manual_seed(0)
        models[name] = make().eval()
        models[name].save_pretrained(root / name)
        with torch.no_grad():
            expected[name] = models[name](**inputs).logits
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LIT_DISTILL, *MODELS], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return root, models, expected, torch.load(root / "results.pt")


@pytest.mark.parametrize("name", list(MODELS))
def test_saved_model_loads_with_plain_transformers(saved, name):
    root, _, expected, results = saved
    config = json.loads((root / name / "config.json").read_text())
    module = MODELS[name][1].removesuffix(".py")
    assert config["auto_map"] == {"AutoConfig": f"{module}.{type(MODELS[name][0]().config).__name__}",
                                  "AutoModelForCausalLM": f"{module}.{config['architectures'][0]}"}
    assert {"common.py", MODELS[name][1]} <= {path.name for path in (root / name).iterdir()}
    assert results[name]["module"].startswith("transformers_modules.")  # the copied code, not lit_distill's
    torch.testing.assert_close(results[name]["logits"], expected[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_registered_classes_win_over_the_saved_code(saved, name):
    """With lit_distill imported, even trust_remote_code=True loads the package's own class."""
    root, models, _, _ = saved
    assert type(AutoModelForCausalLM.from_pretrained(root / name, trust_remote_code=True)) is type(models[name])
