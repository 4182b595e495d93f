"""Model layer: causal LMs from hub ids, local directories, GGUF files, aliases or configs; LoRA; saving."""
from lit_distill.models.loading import (ALIASES, LoRASpec, ModelSpec, build_model, count_parameters,
                                        load_tokenizer, resolve_source, save_pretrained)
from lit_distill.models.reward_model import SCORE_HEAD_FILE, load_reward_model
# Importing pico registers the pico_* model types with AutoConfig / AutoModelForCausalLM (used by build_model).
from lit_distill.models import pico  # noqa: F401  (registration side effect)

__all__ = ["ALIASES", "SCORE_HEAD_FILE", "LoRASpec", "ModelSpec", "build_model", "count_parameters",
           "load_reward_model", "load_tokenizer", "resolve_source", "save_pretrained"]
