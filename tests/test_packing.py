"""Packing: best-fit-decreasing bins, and packed rows scoring exactly like their examples unpacked."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from torch.testing import assert_close

from lit_distill.data.collate import IGNORE_INDEX, collate_sft
from lit_distill.data.packing import PackedDataset, best_fit_decreasing, collate_packed
from lit_distill.data.squad import SQuADDataModule
from lit_distill.models.forward import labelled_logits

VOCAB = 64


def test_best_fit_decreasing_fills_the_tightest_bin():
    # 5 -> new bin A (3 free); 4 -> new bin B (4 free); 3 -> A (the tightest fit, now full); 3 -> B (1 free);
    # 2 -> new bin C; 1 -> B, which has less room than C.
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], capacity=8) == [[0, 2], [1, 3, 5], [4]]


def test_best_fit_decreasing_places_every_example_once_within_capacity():
    lengths = torch.randint(1, 50, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    bins = best_fit_decreasing(lengths, capacity=64)
    assert sorted(index for row in bins for index in row) == list(range(500))
    assert all(sum(lengths[index] for index in row) <= 64 for row in bins)
    assert len(bins) <= 1.25 * sum(lengths) / 64 + 1  # near the lower bound sum / capacity


def test_an_example_longer_than_the_capacity_is_an_error():
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than the packing capacity 8"):
        best_fit_decreasing([3, 9], capacity=8)


def ragged_examples(count=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        prompt, completion = (int(n) for n in torch.randint(1, 9, (2,), generator=generator))
        ids = torch.randint(1, VOCAB, (prompt + completion,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def token_losses(model, batch):
    scored = labelled_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                             position_ids=batch.get("position_ids"))
    return F.cross_entropy(scored.logits, scored.targets, reduction="sum"), scored.targets.numel()


@pytest.mark.parametrize("build, attention", [(tiny_llama, "sdpa"), (tiny_llama, "eager"), (tiny_gpt2, "sdpa"),
                                              (tiny_gpt2, "eager")])
def test_packed_rows_score_like_the_examples_unpacked(build, attention):
    model = build(VOCAB).eval()
    model.set_attn_implementation(attention)
    examples = ragged_examples()
    bins = best_fit_decreasing([len(example["input_ids"]) for example in examples], capacity=24)
    assert any(len(row) > 1 for row in bins)  # several examples share a row
    packed = collate_packed([PackedDataset(examples, bins)[row] for row in range(len(bins))], pad_token_id=0)
    unpacked = collate_sft(examples, pad_token_id=0)
    with torch.no_grad():
        packed_loss, packed_tokens = token_losses(model, packed)
        unpacked_loss, unpacked_tokens = token_losses(model, unpacked)
        cross_attending_loss, _ = token_losses(model, {**packed, "position_ids": None})
    assert packed_tokens == unpacked_tokens
    assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cross_attending_loss, unpacked_loss, rtol=1e-5, atol=1e-5)  # the position ids matter


def test_packed_rows_restart_positions_and_drop_each_examples_first_label():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    row = PackedDataset(examples, [[0, 1]])[0]
    assert row == {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9],
                   "position_ids": [0, 1, 2, 0, 1]}
    batch = collate_packed([row, PackedDataset(examples, [[1]])[0]], pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_squad_packing_keeps_every_labelled_token_in_fewer_rows():
    arguments = dict(embedded_examples=64, max_length=256, seed=3)
    unpacked = SQuADDataModule(**arguments)
    packed = SQuADDataModule(**arguments, packing=True)
    for data in (unpacked, packed):
        data.setup("fit")
    rows, examples = packed.datasets["train"], unpacked.datasets["train"]
    assert len(rows) < len(examples) / 2
    assert all(len(rows[index]["input_ids"]) <= 256 for index in range(len(rows)))
    label_count = sum(sum(label != IGNORE_INDEX for label in rows[index]["labels"]) for index in range(len(rows)))
    assert label_count == sum(sum(label != IGNORE_INDEX for label in example["labels"]) for example in examples)
    batch = next(iter(packed.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert len(packed.datasets["validation"]) == len(unpacked.datasets["validation"])  # evaluation stays unpacked


def test_a_model_that_ignores_packed_position_ids_is_refused():
    from lit_distill.models.loading import ModelSpec, build_model

    pico = build_model(ModelSpec(config={"model_type": "pico_transformer", "hidden_size": 32, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "vocab_size": VOCAB}))
    examples = ragged_examples(count=3)
    packed = collate_packed([PackedDataset(examples, [[0, 1, 2]])[0]], pad_token_id=0)
    with pytest.raises(ValueError, match="PicoTransformer.*would attend across the packed examples"):
        token_losses(pico, packed)
    token_losses(pico, collate_sft(examples, pad_token_id=0))  # unpacked batches are fine


def test_distillation_on_packed_rows_equals_unpacked(llama_dir):
    """Student and teacher both honour the packed position ids: the KD loss and its stats do not change."""
    from lit_distill.models.loading import ModelSpec
    from lit_distill.modules import DistillModule

    torch.manual_seed(0)
    student = ModelSpec(tokenizer="lit-distill/tokenizer",
                        config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    module = DistillModule(student=student, teacher=ModelSpec(name_or_path=llama_dir), alpha=0.3, temperature=2.0)
    examples = ragged_examples()
    bins = best_fit_decreasing([len(example["input_ids"]) for example in examples], capacity=24)
    packed = collate_packed([PackedDataset(examples, bins)[row] for row in range(len(bins))], pad_token_id=0)
    with torch.no_grad():
        _, _, packed_loss, packed_stats = module.distill_loss(packed, alpha=0.3)
        _, _, unpacked_loss, unpacked_stats = module.distill_loss(collate_sft(examples, pad_token_id=0), alpha=0.3)
    assert packed_stats.num_tokens == unpacked_stats.num_tokens
    assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-5)
    assert_close(packed_stats.divergence, unpacked_stats.divergence, rtol=1e-5, atol=1e-6)
