"""Range checks of constructor arguments, run before any model is built: each failure is one ``ValueError`` naming
the argument, its value and what is expected."""

from __future__ import annotations

from typing import Any


def require(condition: bool, name: str, value: Any, expected: str) -> None:
    """Raise ``ValueError("<name> must be <expected>, got <value>")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   prefix: str = "") -> None:
    """The sampling arguments every generating module takes (``lit_distill.rollout.Sampling``); ``prefix`` goes
    before each name in the message (``"sampling."``: ``sampling.top_p must be ...``)."""
    require(max_new_tokens >= 1, f"{prefix}max_new_tokens", max_new_tokens, ">= 1")
    require(temperature > 0, f"{prefix}temperature", temperature, "> 0 (sampling divides the logits by it)")
    require(top_k >= 0, f"{prefix}top_k", top_k, ">= 0 (0 keeps every token)")
    require(0 < top_p <= 1, f"{prefix}top_p", top_p, "in (0, 1] (1 keeps every token)")
