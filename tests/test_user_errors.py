"""Mistakes a user can make get one clear error, before any model is built (the model specs here name a directory
that does not exist: reaching the model build would raise another error)."""

import pytest

from lit_distill.models.loading import ModelSpec
from lit_distill.modules import AgentModule, DistillModule, DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule

MISSING = ModelSpec(name_or_path="/nonexistent/model")


@pytest.mark.parametrize("module, arguments, message", [
    (DistillModule, {"temperature": 0}, "temperature must be > 0"),
    (DistillModule, {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    (DistillModule, {"on_policy_fraction": 0.5, "sampling_temperature": -1.0}, "temperature must be > 0"),
    (DistillModule, {"chunk_size": 0}, "chunk_size must be >= 1"),
    (GRPOModule, {"beta": -0.5}, "beta must be >= 0"),
    (GRPOModule, {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    (GRPOModule, {"clip_eps_high": 0.1}, r"clip_eps_high must be >= clip_eps \(0.2\)"),
    (PPOModule, {"gamma": 1.5}, r"gamma and lam must be in \[0, 1\]"),
    (PPOModule, {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    (DPOModule, {"beta": 0.0}, "beta must be > 0"),
    (DPOModule, {"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    (AgentModule, {"temperature": 0.0}, "temperature must be > 0"),
    (RewardModule, {"center_coefficient": -1.0}, "center_coefficient must be >= 0"),
    (SFTModule, {"eval_max_new_tokens": 0}, "eval_max_new_tokens must be >= 1"),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_out_of_range_arguments_fail_before_any_model_is_built(module, arguments, message):
    models = {DistillModule: {"student": MISSING, "teacher": MISSING}, GRPOModule: {"policy": MISSING, "rewards": []},
              PPOModule: {"policy": MISSING, "rewards": []}, DPOModule: {"policy": MISSING},
              AgentModule: {"student": MISSING, "teacher": None}, RewardModule: {"model": MISSING},
              SFTModule: {"model": MISSING}}[module]
    with pytest.raises(ValueError, match=message):
        module(**models, **arguments)
