"""``Sampling``: how a module samples its completions, one group of arguments shared by every generating module
(``model.init_args.sampling`` in a config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lit_distill.checks import check_sampling


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled: ``generate``'s sampling arguments as one group (greedy evaluation, with
    ``do_sample=False``, ignores ``top_k`` and ``top_p``). Invalid values fail here, naming the field.

    Attributes:
        max_new_tokens: completion budget in tokens; a completion without EOS or stop string by then is truncated.
        temperature: divides the logits before sampling; the completions' log-probs (RL ratios, KL) use it too.
        top_k: sample among the k most likely tokens; 0 keeps every token.
        top_p: nucleus sampling mass in (0, 1]; 1 keeps every token.
        stop_strings: a completion ends at the token completing the first of these strings, as at EOS.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_strings: Sequence[str] = ()

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, prefix="sampling.")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))  # hashable, and a list is never shared

    @classmethod
    def of(cls, value: Sampling | dict[str, Any]) -> Sampling:
        """``value`` itself, or a ``Sampling`` made of a config mapping (what hyper-parameters hold when the CLI
        built the module)."""
        return value if isinstance(value, cls) else cls(**value)

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``generate`` (and ``CausalLMModule.complete``) these settings stand for."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "stop_strings": self.stop_strings}


# Sampling settings are stored in checkpoint hyper-parameters; allow them in torch.load(weights_only=True).
torch.serialization.add_safe_globals([Sampling])
