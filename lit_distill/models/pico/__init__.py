"""Pico models: three small causal-LM architectures that behave like Hugging Face models.

Each is a ``transformers.PreTrainedModel`` with its own config class (all derived from :class:`PicoConfig`),
registered with ``AutoConfig`` and ``AutoModelForCausalLM`` when this package is imported (``lit_distill.models``
imports it), so YAML selects them like any HF architecture::

    student:
      config: {model_type: pico_transformer, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4}
      tokenizer: lit-distill/tokenizer

* ``pico_transformer`` (:mod:`.transformer`, :class:`PicoTransformerForCausalLM`): pre-norm decoder-only
  transformer with rotary or learned positions, SDPA attention and a ``DynamicCache``.
* ``pico_lstm`` (:mod:`.lstm`, :class:`PicoLSTMForCausalLM`): embedding -> stacked ``nn.LSTM`` -> linear head; its
  cache is a :class:`PicoLSTMState`.
* ``pico_kgram`` (:mod:`.kgram`, :class:`PicoKGramForCausalLM`): fixed-context MLP language model (Bengio et al.,
  2003); its cache is a :class:`PicoKGramCache`.

All three follow the HF calling convention (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values``, ``use_cache``, ``labels``, ``logits_to_keep``) and return ``CausalLMOutputWithPast``, so
``lit_distill.rollout.generate`` / ``sequence_logprobs``, ``save_pretrained`` and peft LoRA (on their ``nn.Linear``
layers) work unchanged. ``attention_mask`` may cover the cached past plus the new tokens (HF convention) or only
the new tokens.

Padding (the recurrent and k-gram models ignore ``position_ids``): a position whose mask is 0 never changes the
recurrent state or the k-gram context, so a prompt gives the same continuation alone or left-padded in a batch.
When the mask of a call has zeros, the LSTM and k-gram models move each row's real tokens to the front (one stable
sort + gather), run the packed LSTM (``pack_padded_sequence``, one call per layer; the lengths go to the CPU, which
is one device sync) or build the k-token windows over them, and gather the results back, so the cost stays one
batched pass instead of a per-token loop. Logits at padded positions are those of the latest real token before them
(or of the initial state) and carry no meaning.

All three also mix in ``GenerationMixin``: HF ``model.generate`` passes their own cache objects back unchanged and
gives the same greedy tokens as our engine.

Loading a saved pico model: after ``import lit_distill.models`` (or ``lit_distill.models.pico``; a bare ``import
lit_distill`` does not import it), ``AutoModelForCausalLM.from_pretrained(path)`` finds the registered classes;
``build_model`` / ``ModelSpec(name_or_path=...)`` import it. Without lit_distill, ``from_pretrained(path,
trust_remote_code=True)`` runs the code ``save_pretrained`` copied into ``path`` (``auto_map`` in config.json names
it): the model's file and ``common.py``, which import only torch, transformers and huggingface_hub. Directories saved
before the copy existed have no ``auto_map`` and need the import.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .common import PicoConfig, causal_lm_loss
from .kgram import ACTIVATIONS, PicoKGramBlock, PicoKGramCache, PicoKGramConfig, PicoKGramForCausalLM
from .lstm import PicoLSTMConfig, PicoLSTMForCausalLM, PicoLSTMState
from .transformer import (PicoAttention, PicoMLP, PicoRMSNorm, PicoTransformerBlock, PicoTransformerConfig,
                          PicoTransformerForCausalLM, PicoTransformerModel, PicoTransformerPreTrainedModel,
                          apply_rotary, rotary_cos_sin)

# The registration serves processes that import this package (no trust_remote_code needed, and these classes win
# over the saved code copy); register_for_auto_class makes save_pretrained write `auto_map` to config.json and copy
# the model's file with its relative imports (common.py), for processes without lit_distill.
for _config, _model in ((PicoTransformerConfig, PicoTransformerForCausalLM), (PicoLSTMConfig, PicoLSTMForCausalLM),
                        (PicoKGramConfig, PicoKGramForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModelForCausalLM")
AutoModel.register(PicoTransformerConfig, PicoTransformerModel, exist_ok=True)
PicoTransformerModel.register_for_auto_class("AutoModel")

PICO_MODEL_TYPES = ("pico_transformer", "pico_lstm", "pico_kgram")

__all__ = ["ACTIVATIONS", "PICO_MODEL_TYPES", "PicoAttention", "PicoConfig", "PicoKGramBlock", "PicoKGramCache",
           "PicoKGramConfig", "PicoKGramForCausalLM", "PicoLSTMConfig", "PicoLSTMForCausalLM", "PicoLSTMState",
           "PicoMLP", "PicoRMSNorm", "PicoTransformerBlock", "PicoTransformerConfig", "PicoTransformerForCausalLM",
           "PicoTransformerModel", "PicoTransformerPreTrainedModel", "apply_rotary", "causal_lm_loss",
           "rotary_cos_sin"]
