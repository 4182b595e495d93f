"""OnlineDPOModule: best-vs-worst pairs, one step equal to a naive DPO update computed sequence by sequence on the
same sampled pairs, micro-batch equivalence, ties that do not train, and the shipped quickstart config."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lit_distill.losses import best_worst_pairs
from lit_distill.models.loading import ModelSpec
from lit_distill.modules import OnlineDPOModule
from lit_distill.rollout import Sampling
from tests.test_cli import ddp_fit_metrics
from tests.test_rl_modules import Constant, LetterCount, assert_unchanged, fit, prompt_batches, sgd, trained_parameters


def online_dpo(llama_dir, **kwargs):
    settings = dict(policy=ModelSpec(llama_dir), rewards=[LetterCount()], sampling=Sampling(max_new_tokens=6,
                    temperature=0.7), num_generations=2, beta=0.5, seed=3, optimizer=sgd(1.0), max_grad_norm=None)
    settings.update(kwargs)
    return OnlineDPOModule(**settings)


def test_best_worst_pairs_reference_values():
    rewards = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0, -1.0, 4.0, 2.0, 7.0, 7.0])
    chosen, rejected, decisive = best_worst_pairs(rewards, 3)
    assert chosen.tolist() == [1, 3, 8, 10]  # the first of equal maxima (row 10, not 11)
    assert rejected.tolist() == [0, 3, 7, 9]
    assert decisive.tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="groups of 5"):
        best_worst_pairs(rewards, 5)


def naive_sequence_logp(model, sequence, attention_mask, prompt_length, temperature):
    """log π(completion | prompt) of one row, its padding stripped, from one unpadded forward."""
    real = attention_mask.bool()
    prompt_start = int((~real[:prompt_length]).sum())  # left padding
    ids = sequence[real]  # prompt then completion, no padding
    num_prompt = prompt_length - prompt_start
    logits = model(ids[None]).logits[0, num_prompt - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[num_prompt:, None]).sum()


def record_pairs(monkeypatch, module):
    seen = []
    sample_pairs = module.sample_pairs

    def recording(batch):
        seen.append(sample_pairs(batch))
        return seen[-1]

    monkeypatch.setattr(module, "sample_pairs", recording)
    return seen


def test_one_step_equals_a_naive_dpo_update_on_the_sampled_pairs(llama_dir, tokenizer, monkeypatch):
    module = online_dpo(llama_dir)
    policy, reference = copy.deepcopy(module.model), copy.deepcopy(module.reference)
    seen = record_pairs(monkeypatch, module)
    trainer = fit(module, prompt_batches(tokenizer, batch_size=4, num_batches=1), max_steps=1)

    (pairs, scores, decisive), = seen
    assert scores[0::2].ge(scores[1::2]).all() and decisive.equal(scores[0::2] > scores[1::2])
    assert 0 < decisive.sum() < 4, "the test needs decisive pairs and a tie"
    args = [(pairs.sequences[row], pairs.attention_mask[row], pairs.prompt_length, 0.7) for row in range(8)]
    with torch.no_grad():
        reference_logps = torch.stack([naive_sequence_logp(reference, *a) for a in args])
    policy_logps = torch.stack([naive_sequence_logp(policy, *a) for a in args])
    h = (policy_logps[0::2] - reference_logps[0::2]) - (policy_logps[1::2] - reference_logps[1::2])
    loss = -F.logsigmoid(0.5 * h[decisive]).mean()
    loss.backward()
    for name, parameter in policy.named_parameters():
        expected = parameter.detach() - parameter.grad  # SGD, lr 1
        torch.testing.assert_close(module.model.get_parameter(name).detach(), expected, rtol=1e-4, atol=1e-6,
                                   msg=name)
    metrics = trainer.callback_metrics
    assert metrics["online_dpo/decisive_frac"].item() == decisive.float().mean().item()
    torch.testing.assert_close(metrics["online_dpo/loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert metrics["online_dpo/score_chosen"] >= metrics["online_dpo/score_rejected"]


def test_micro_batches_of_pairs_give_the_same_update(llama_dir, tokenizer):
    whole = online_dpo(llama_dir, loss_type="ipo")
    fit(whole, prompt_batches(tokenizer, batch_size=4, num_batches=1), max_steps=1)
    micro = online_dpo(llama_dir, loss_type="ipo", micro_batch_size=2)
    fit(micro, prompt_batches(tokenizer, batch_size=4, num_batches=1), max_steps=1)
    initial = trained_parameters(online_dpo(llama_dir))
    after = trained_parameters(whole)
    assert any(not torch.equal(after[name], initial[name]) for name in after)
    for name, value in trained_parameters(micro).items():
        torch.testing.assert_close(value, after[name], rtol=1e-4, atol=1e-6, msg=name)


def test_tied_pairs_do_not_train(llama_dir, tokenizer):
    module = online_dpo(llama_dir, rewards=[Constant()])
    before = trained_parameters(module)
    trainer = fit(module, prompt_batches(tokenizer, batch_size=4, num_batches=1), max_steps=1)
    assert trainer.callback_metrics["online_dpo/decisive_frac"].item() == 0.0
    assert "dpo/accuracy" not in trainer.callback_metrics
    assert_unchanged(module, before)


@pytest.mark.parametrize("settings,field", [({"micro_batch_size": 3}, "micro_batch_size"),
                                            ({"num_generations": 1}, "num_generations"),
                                            ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing")])
def test_bad_settings_name_their_field(llama_dir, settings, field):
    with pytest.raises(ValueError, match=field):
        online_dpo(llama_dir, **settings)


def test_the_quickstart_trains_under_two_process_ddp(tmp_path):
    """Decisive pairs are counted over both ranks (the loss's denominator) and the ranks step together."""
    metrics = ddp_fit_metrics(tmp_path, ["configs/dpo/online.yaml"], "--data.init_args.num_embedded", "64",
                          "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "4",
                          "--trainer.callbacks.init_args.max_batches", "1")
    assert len(metrics["online_dpo/decisive_frac"]) == 2 and metrics["val/reward_mean"]
