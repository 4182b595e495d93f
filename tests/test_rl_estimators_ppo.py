"""PPO's adaptive KL controller (Ziegler et al. 2019) and cleanrl's target_kl early stop: the pure update against
hand values and a fixed-KL trajectory, and PPOModule logging them, stopping early and resuming β exactly."""

import lightning as L
import pytest
import torch

from lit_distill.losses.ppo import adaptive_kl_coef
from tests.test_rl_modules import fit, ppo, prompt_batches, sgd


def test_adaptive_kl_coef_hand_values():
    # error = KL / target − 1, clipped to ±0.2, times n_steps / horizon = 10 / 100.
    assert adaptive_kl_coef(0.1, kl=6.0, target=4.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, kl=3.6, target=4.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert adaptive_kl_coef(0.1, kl=0.0, target=4.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, kl=4.0, target=4.0, horizon=100, n_steps=10) == 0.1


def test_adaptive_kl_controller_trajectory_for_a_fixed_kl_sequence():
    kls = [8.0, 8.0, 5.0, 4.0, 3.0, 0.5, 4.4]
    beta, trajectory = 0.2, []
    for kl in kls:
        beta = adaptive_kl_coef(beta, kl, target=4.0, horizon=64, n_steps=32)
        trajectory.append(beta)
    # Written out: factors 1 + e·32/64 with e = 0.2, 0.2, 0.2 (0.25 clipped), 0, −0.2 (−0.25 clipped), −0.2, 0.1.
    factors = [1.1, 1.1, 1.1, 1.0, 0.9, 0.9, 1.05]
    expected = [0.2 * torch.tensor(factors[:i + 1]).prod().item() for i in range(len(factors))]
    assert trajectory == pytest.approx(expected, rel=1e-6)


def test_ppo_adaptive_kl_coef_is_logged_and_resumes_exactly(llama_dir, tokenizer, tmp_path):
    # lr = 0: the policy stays the reference, KL = 0 and β shrinks by 1 − 0.2 · 4 / 8 = 0.9 per rollout of 4.
    settings = dict(kl_coef=0.05, kl_target=1.0, kl_horizon=8, ppo_epochs=1)
    data = prompt_batches(tokenizer, batch_size=4, num_batches=3)
    module = ppo(llama_dir, **settings)
    trainer = fit(module, data, max_steps=2)
    assert trainer.callback_metrics["ppo/kl_coef"].item() == pytest.approx(0.05 * 0.9)  # β of the second rollout
    assert module.kl_coef == pytest.approx(0.05 * 0.9 ** 2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")

    resumed = ppo(llama_dir, **settings)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1)
    trainer.fit(resumed, torch.utils.data.DataLoader(data, batch_size=None), ckpt_path=tmp_path / "two.ckpt")
    assert trainer.callback_metrics["ppo/kl_coef"].item() == pytest.approx(0.05 * 0.9 ** 2)
    assert resumed.kl_coef == pytest.approx(0.05 * 0.9 ** 3)


@pytest.mark.parametrize("target_kl,updates", [(1e-9, 2), (1e9, 3)])
def test_ppo_target_kl_stops_the_epochs_early(llama_dir, tokenizer, target_kl, updates):
    # One minibatch: epoch 1 starts at the sampling policy (approx_kl exactly 0, no stop); after one SGD step the
    # approx_kl of epoch 2 is > 0, so a tiny target stops there: 2 of the 3 updates.
    module = ppo(llama_dir, ppo_epochs=3, target_kl=target_kl, optimizer=sgd(1.0))
    trainer = fit(module, prompt_batches(tokenizer, batch_size=4, num_batches=1), max_steps=2)  # one rollout
    metrics = trainer.callback_metrics
    assert trainer.global_step == updates
    assert metrics["ppo/updates"].item() == updates
    assert metrics["ppo/early_stopped"].item() == float(updates < 3)
