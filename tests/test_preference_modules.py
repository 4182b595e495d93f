"""RewardModule and DPOModule: score position, references, step-0 values, what is optimised and saved."""

import math

import lightning as L
import pytest
import torch

from conftest import TOKENIZER
from lit_distill.data import SQuADPreferenceDataModule
from lit_distill.losses import dpo_loss
from lit_distill.models.heads import last_token_index
from lit_distill.models.loading import LoRASpec, ModelSpec
from lit_distill.modules import DPOModule, RewardModule, load_reward_model

POLICY = dict(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 4}, tokenizer=TOKENIZER)


def preference_data(**kwargs):
    data = SQuADPreferenceDataModule(embedded_examples=64, batch_size=8, max_length=96, **kwargs)
    data.setup("fit")
    return data


def first_batch(data):
    return next(iter(data.train_dataloader()))


def fit(module, data, **kwargs):
    settings = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, max_steps=2, limit_val_batches=2, num_sanity_val_steps=0)
    settings.update(kwargs)
    trainer = L.Trainer(**settings)
    trainer.fit(module, datamodule=data)
    return trainer


def test_last_token_index_uses_the_mask_not_the_pad_id():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_reward_score_is_read_at_the_last_real_token_when_pad_equals_eos():
    torch.manual_seed(0)
    module = RewardModule(model=ModelSpec(**POLICY))
    eos = module.tokenizer.eos_token_id
    ids = torch.tensor([[5, 6, 7, eos, eos, eos]])  # the first eos is real, the others are padding
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        padded = module.scores(ids, mask)
        alone = module.scores(ids[:, :4], mask[:, :4])
    torch.testing.assert_close(padded, alone)


def test_reward_head_starts_small_and_is_optimised_with_the_backbone():
    torch.manual_seed(0)
    module = RewardModule(model=ModelSpec(**POLICY))
    batch = first_batch(preference_data())
    with torch.no_grad():
        loss, _ = module.pair_loss(batch, reduction="mean")
    assert abs(loss.item() - math.log(2)) < 0.1
    optimised = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert {id(p) for p in module.score_head.parameters()} <= optimised


def test_reward_training_saves_a_loadable_reward_model(tmp_path):
    torch.manual_seed(0)
    module = RewardModule(model=ModelSpec(**POLICY), save_dir=str(tmp_path / "rm"),
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = preference_data()
    fit(module, data)
    backbone, head, tokenizer = load_reward_model(str(tmp_path / "rm"))
    batch = first_batch(data)
    with torch.no_grad():
        expected = module.eval().scores(batch["chosen_input_ids"], batch["chosen_attention_mask"])
        from lit_distill.models.heads import final_hidden_states
        hidden = final_hidden_states(backbone, batch["chosen_input_ids"], batch["chosen_attention_mask"])
        torch.testing.assert_close(head.score(hidden, batch["chosen_attention_mask"]), expected)


@pytest.mark.parametrize("reference", ["copy", "lora", "precomputed"])
def test_dpo_step_zero_is_log_two_with_zero_rewards(reference):
    torch.manual_seed(0)
    policy = dict(POLICY, lora=LoRASpec(r=4, alpha=8)) if reference == "lora" else POLICY
    module = DPOModule(policy=ModelSpec(**policy), precompute_reference=reference == "precomputed")
    data = preference_data()
    if reference == "precomputed":
        module.trainer = L.Trainer(accelerator="cpu", logger=False)  # what precompute reads: the datamodule
        module.trainer.strategy.connect(module)
        module.trainer.datamodule = data
        module.precompute_reference_logps()
        assert module.reference is None and len(module.precomputed) >= len(data.datasets["train"])
    with torch.no_grad():
        loss, stats, _, _ = module.preference_loss(first_batch(data), reduction="mean")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats.rewards_chosen.abs().max() < 1e-5 and stats.rewards_rejected.abs().max() < 1e-5


def test_dpo_reference_is_frozen_out_of_optimizer_and_checkpoint_and_no_dropout(tmp_path):
    torch.manual_seed(0)
    module = DPOModule(policy=ModelSpec(**POLICY), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    optimised = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in module.reference.parameters()}
    trainer = fit(module, preference_data())
    assert not module.model.training and not module.reference.training
    trainer.save_checkpoint(tmp_path / "dpo.ckpt")
    state = torch.load(tmp_path / "dpo.ckpt", weights_only=False)["state_dict"]
    assert state and not [key for key in state if key.startswith("reference.")]


def test_dpo_training_raises_the_preference_margin():
    torch.manual_seed(0)
    module = DPOModule(policy=ModelSpec(**POLICY), beta=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    data = preference_data()
    batch = first_batch(data)
    fit(module, data, max_steps=30, limit_val_batches=0)
    with torch.no_grad():
        _, stats, _, _ = module.preference_loss(batch, reduction="mean")
    assert stats.margin.mean() > 0.5 and stats.accuracy > 0.8


def test_dpo_module_matches_the_loss_function_on_its_own_log_probs():
    torch.manual_seed(0)
    module = DPOModule(policy=ModelSpec(**POLICY), loss_type="ipo", beta=0.2)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # policy != reference
        batch = first_batch(preference_data())
        loss, _, chosen, rejected = module.preference_loss(batch, reduction="mean")
        reference_chosen, reference_rejected = module.sequence_logps(module.reference, batch)
    expected, _ = dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta=0.2, loss_type="ipo")
    torch.testing.assert_close(loss, expected)
    assert loss.item() != pytest.approx((1 / (2 * 0.2)) ** 2)  # the perturbation moved the log-ratios


@pytest.mark.parametrize("model_type", ["pico_transformer", "pico_lstm", "pico_kgram"])
def test_reward_and_dpo_run_with_pico_models(model_type):
    spec = ModelSpec(config={"model_type": model_type, "hidden_size": 32, "num_hidden_layers": 1},
                     tokenizer=TOKENIZER)
    data = preference_data()
    torch.manual_seed(0)
    reward = RewardModule(model=spec)
    fit(reward, data, max_steps=1, limit_val_batches=1)
    dpo = DPOModule(policy=spec)
    with torch.no_grad():
        loss, _, _, _ = dpo.preference_loss(first_batch(data), reduction="mean")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    fit(dpo, data, max_steps=1, limit_val_batches=1)
