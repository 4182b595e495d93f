"""GRPOModule with the RLOO / REINFORCE++ estimators and DAPO's dynamic sampling, on a tiny random Llama with a
deterministic reward: filtered groups never reach the loss and the batch is refilled from the training dataset."""

import pytest
import torch

import lit_distill.modules.grpo as grpo_module
from lit_distill.rewards import Reward
from lit_distill.rollout import left_pad
from tests.test_rl_modules import assert_unchanged, fit, grpo, sgd, trained_parameters

LIVE = ["Mara is a baker", "The cat", "Hugo lives in", "Lena has a red"]
DEAD = ["Ben", "Ivy", "A", "Seven plus five is"]


class GatedLetterCount(Reward):
    """The number of letters 'e' in the completion, except for the DEAD prompts, where every completion gets 1
    (their groups' rewards are all equal)."""

    def forward(self, prompts, completions, **columns):
        return [1.0 if prompt in DEAD else float(completion.count("e")) for prompt, completion in
                zip(prompts, completions)]


def batches(tokenizer, texts_per_batch):
    out = []
    for texts in texts_per_batch:
        ids, mask = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
        out.append({"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt": list(texts)})
    return out


def record_loss_inputs(monkeypatch, module):
    """What reaches the loss: each micro-batch's (advantages, mask) and each step's rollout prompts and rewards."""
    seen = {"loss": [], "rollouts": []}
    loss = grpo_module.grpo_loss

    def recording_loss(logprobs, old, advantages, mask, **kwargs):
        seen["loss"].append((advantages.clone(), mask.clone()))
        return loss(logprobs, old, advantages, mask, **kwargs)

    rollout_groups = module.rollout_groups

    def recording_rollout_groups(batch):
        rollout, rewards, trainable = rollout_groups(batch)
        prompts = module.tokenizer.batch_decode(rollout.sequences[:, :rollout.prompt_length], skip_special_tokens=True)
        seen["rollouts"].append((prompts, rewards.clone(), trainable.clone()))
        return rollout, rewards, trainable

    monkeypatch.setattr(grpo_module, "grpo_loss", recording_loss)
    monkeypatch.setattr(module, "rollout_groups", recording_rollout_groups)
    return seen


def test_dynamic_sampling_drops_equal_groups_and_refills_from_the_dataloader(llama_dir, tokenizer, monkeypatch):
    # Each batch: one live prompt, one dead. Round 1 keeps 1 group of 2; a refill batch from the dataloader brings
    # another live one, so the step trains on 2 live groups, none dead, after 2 rounds and 2 dropped groups. The
    # refill is an item of the loader's dataset drawn by the step's seed (this loader's items are whole batches).
    data = batches(tokenizer, [[live, dead] for live, dead in zip(LIVE, DEAD)])
    module = grpo(llama_dir, rewards=[GatedLetterCount()], beta=0.0, dynamic_sampling=True, max_sampling_rounds=4)
    refills = []
    next_prompts = module.next_prompts
    monkeypatch.setattr(module, "next_prompts", lambda round: refills.append(next_prompts(round)) or refills[-1])
    seen = record_loss_inputs(monkeypatch, module)
    trainer = fit(module, data, max_steps=1)

    prompts, rewards, trainable = seen["rollouts"][0]
    assert len(prompts) == 2 * 4 and trainable.all()  # refilled to the batch's 2 groups of G = 4
    assert not set(prompts) & set(DEAD)
    assert not any(group.eq(group[0]).all() for group in rewards.view(-1, 4))
    assert len(refills) == 1 and refills[0]["prompt"] in [[live, dead] for live, dead in zip(LIVE, DEAD)]
    assert prompts[4] == refills[0]["prompt"][0]  # the refilled group is the refill batch's live prompt
    (advantages, mask), = seen["loss"]
    assert mask.size(0) == 8 and mask.sum(-1).gt(0).all()
    metrics = trainer.callback_metrics
    assert metrics["dapo/sampling_rounds"].item() == 2 and metrics["dapo/groups_dropped"].item() == 2
    assert metrics["dapo/groups_short"].item() == 0
    assert metrics["grpo/frac_zero_std"].item() == 0.5  # of the first round


def test_dynamic_sampling_stops_at_the_round_cap_and_keeps_short_fill_out_of_the_loss(llama_dir, tokenizer,
                                                                                       monkeypatch):
    data = batches(tokenizer, [DEAD[:2], DEAD[2:]])
    module = grpo(llama_dir, rewards=[GatedLetterCount()], beta=0.0, dynamic_sampling=True, max_sampling_rounds=3,
                  optimizer=sgd(1.0))
    before = trained_parameters(module)
    seen = record_loss_inputs(monkeypatch, module)
    trainer = fit(module, data, max_steps=1)
    metrics = trainer.callback_metrics
    assert metrics["dapo/sampling_rounds"].item() == 3 and metrics["dapo/groups_dropped"].item() == 6
    assert metrics["dapo/groups_short"].item() == 2
    _, _, trainable = seen["rollouts"][0]
    assert not trainable.any()
    assert all(mask.sum() == 0 for _, mask in seen["loss"])  # the fill is in the tensors, not in the loss
    assert metrics["grpo/loss"].item() == 0.0
    assert_unchanged(module, before)


def prompt_rows(tokenizer, texts):
    """A map-style dataset of single prompts and the collate function batching them, as a DataModule serves them."""
    rows = [{"prompt_input_ids": tokenizer(text)["input_ids"], "prompt": text} for text in texts]

    def collate(items):
        ids, mask = left_pad([item["prompt_input_ids"] for item in items], tokenizer.pad_token_id)
        return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt": [item["prompt"] for item in items]}

    return rows, collate


def test_refill_prompts_are_a_function_of_the_step_and_round_not_of_the_loaders_position(llama_dir, tokenizer):
    # A resumed run restores global_step and so refills exactly as an uninterrupted one; the Trainer's batches stay
    # its own. Two runs agree on every refill; the rounds of a step draw different rows of the dataset.
    rows, collate = prompt_rows(tokenizer, LIVE + DEAD)
    refills = []
    for _ in range(2):
        module = grpo(llama_dir, dynamic_sampling=True)
        fit(module, torch.utils.data.DataLoader(rows, batch_size=3, collate_fn=collate), max_steps=1)
        refills.append([module.next_prompts(round)["prompt"] for round in (1, 2, 3)])
        assert module.next_prompts(1)["prompt"] == refills[-1][0]  # asked again: the same rows, not the next ones
    assert refills[0] == refills[1]
    assert all(len(set(prompts)) == 3 and set(prompts) <= set(LIVE + DEAD) for prompts in refills[0])
    assert len({tuple(prompts) for prompts in refills[0]}) > 1


class PromptStream(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_dynamic_sampling_on_a_streamed_dataset_is_an_error_at_train_start(llama_dir, tokenizer):
    module = grpo(llama_dir, dynamic_sampling=True)
    stream = torch.utils.data.DataLoader(PromptStream(batches(tokenizer, [LIVE[:2]])), batch_size=None)
    with pytest.raises(ValueError, match="dynamic_sampling refills from a map-style training dataset"):
        fit(module, stream, max_steps=1)


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_estimators_train_on_the_grpo_plumbing_with_exact_ratios_at_zero_lr(llama_dir, tokenizer, estimator,
                                                                            monkeypatch):
    data = batches(tokenizer, [LIVE[:2], LIVE[2:]])
    module = grpo(llama_dir, rewards=[GatedLetterCount()], advantage_estimator=estimator, beta=0.1,
                  num_iterations=2)
    seen = record_loss_inputs(monkeypatch, module)
    trainer = fit(module, data, max_steps=4)
    metrics = trainer.callback_metrics
    assert metrics["grpo/clip_ratio"].item() == 0.0 and metrics["grpo/approx_kl"].item() == 0.0
    advantages, mask = seen["loss"][0]
    if estimator == "reinforce_pp":
        assert advantages.shape == mask.shape  # per-token, whitened over the batch's tokens
        assert abs((advantages * mask).sum().item()) < 1e-4
        assert metrics["rollout/kl"].item() == 0.0  # the reference is the initial policy, lr = 0
    else:
        assert advantages.dim() == 1
        torch.testing.assert_close(advantages.view(-1, 4).sum(-1), torch.zeros(2), atol=1e-5, rtol=0)
