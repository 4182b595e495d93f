"""Model layer: causal LMs from hub ids, local directories, GGUF files, aliases or configs; LoRA; saving."""
from lit_distill.models.loading import (ALIASES, LoRASpec, ModelSpec, build_model, count_parameters,
                                        load_tokenizer, resolve_source, save_pretrained)

__all__ = ["ALIASES", "LoRASpec", "ModelSpec", "build_model", "count_parameters", "load_tokenizer",
           "resolve_source", "save_pretrained"]
