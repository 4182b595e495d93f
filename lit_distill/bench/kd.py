"""Logit distillation, off-policy and on-policy: lit_distill's ``DistillModule`` against TRL's ``GKDTrainer``.

Both sides distil ``teacher/`` into ``student/`` with the pure forward KL(p_teacher ‖ p_student) at temperature 1:
``DistillModule(divergence="forward_kl", alpha=0)`` and ``GKDConfig(beta=0)`` (in ``GKDTrainer.generalized_jsd_loss``
β = 0 is ``F.kl_div(student_log_probs, teacher_log_probs, log_target=True)``, i.e. KL(teacher ‖ student); β = 1 would
be the reverse KL). The on-policy fraction is λ = 0 (``kd_off_policy``: the data's completions) or λ = 1
(``kd_on_policy``: the student samples ``options.new_tokens`` tokens at temperature 1, top-k 0, top-p 1, and the
divergence is taken on its own completion tokens, EOS included); ``on_policy_fraction`` and GKD's ``lmbda``.

TRL's KD trainer with λ is ``trl.experimental.gkd.GKDTrainer``; ``trl.DistillationTrainer`` (TRL 1.16) is
on-policy only (prompts in, completions always generated, no λ) and is not used here.

The data, identical on both sides: every row of ``sft.jsonl`` (no validation split), prompt and completion
tokenised separately and concatenated, the completion followed by EOS (``lit_distill.data.collate.encode_pair``, as
``SQuADDataModule`` does, with the workload's tokenizer on both sides), truncated to ``options.max_length``; batches
of ``options.batch_size`` right-padded rows in the order lit_distill's DataModule draws them
(``trainers.training_order``; TRL reads the rows, put in that order, sequentially), so step k trains on the same
rows on both sides. The loss covers the completion tokens (the labels mask the prompt and the padding). Both load
student and teacher from their directories in fp32 (the teacher frozen, in eval mode; the student without dropout),
and use the settings of ``lit_distill.bench.trainers`` (AdamW, constant LR, clipping at 1.0, no evaluation, ...).
Off-policy, the first steps' losses agree to about 1e-7 (checked by the tests).

Differences that remain:

* Collation: TRL is given a collator that right-pads like lit_distill (``collate_sft``) and adds the left-padded
  prompts GKD generates from. TRL's default ``DataCollatorForChatML`` would left-pad without position ids, so the
  shorter rows of a batch would be seen at shifted positions and the logits would differ from lit_distill's; with
  right padding both compute the same logits and the same step-0 loss (off-policy). GKD's collator also needs
  chat-formatted ``messages``, which this workload does not have.
* On-policy data: lit_distill's on-policy batches are rows holding only their prompt (``DistillModule`` keeps the
  first ``prompt_tokens`` real tokens of each row as its prompt; ``prompt_tokens = options.max_length`` keeps
  the whole prompt); TRL's hold prompt and completion, whose completion is replaced by the sample. Both sample
  from the same left-padded prompts; the draws differ (each side has its own random stream), so completion
  lengths (an EOS stops a row early) differ a little: with the random tiny models nearly every completion runs
  the full ``new_tokens``.
* On-policy normalisation: TRL divides the summed divergence by ``num_items_in_batch``, which the HF Trainer
  counts on the *data's* labels before GKD replaces them by the student's completion, not by the number of
  generated tokens as lit_distill does; the loss (and gradient) scale differs, the work does not.
* Per step lit_distill also computes the teacher's log-prob of every label (``DistillModule.distill_loss``, used for
  evaluation perplexity) and TRL calls ``empty_cache()`` after every loss; both are part of each side's cost.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from typing import Optional

from lit_distill.bench import timing, trainers
from lit_distill.bench.workload import Measurement, Options, Workload, read_jsonl
from lit_distill.data.base import EncodedDataModule
from lit_distill.data.collate import collate_sft, encode_pair
from lit_distill.models.loading import load_tokenizer

EXAMPLE_COLUMNS = ("input_ids", "labels", "prompt_ids")


def encode_rows(path: str, tokenizer, max_length: int) -> list[dict]:
    """Every row of an ``sft.jsonl`` (``prompt``, ``completion``), encoded by ``encode_pair``: ``input_ids``,
    ``labels`` (prompt masked) and ``prompt_ids``, in file order."""
    return [encode_pair(tokenizer, row["prompt"], row["completion"], max_length) for row in read_jsonl(path)]


class SFTRowsDataModule(EncodedDataModule):
    """The benchmark's ``sft.jsonl`` for ``DistillModule``: ``encode_rows`` examples, right-padded by ``collate_sft``.

    With ``prompts_only`` each example is its prompt alone (``input_ids = labels = prompt_ids``), for on-policy
    distillation, where the student writes the completion.
    """

    def __init__(self, path: str, tokenizer: str, max_length: int, batch_size: int, prompts_only: bool = False,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)

    def build_split(self, split: str) -> list[dict]:
        hp = self.hparams
        if split != "train":
            return []  # the benchmark does not evaluate
        examples = encode_rows(hp.path, self.tokenizer, hp.max_length)
        if hp.prompts_only:
            examples = [{"input_ids": e["prompt_ids"], "labels": e["prompt_ids"], "prompt_ids": e["prompt_ids"]}
                        for e in examples]
        return examples

    def collate_fn(self, split: str):
        return partial(collate_sft, pad_token_id=self.tokenizer.pad_token_id)


class GKDCollator:
    """TRL's side of the batches: ``collate_sft`` (right-padded ``input_ids``, ``attention_mask``, ``labels``, as
    lit_distill's) plus ``prompts`` / ``prompt_attention_mask`` (left-padded), which ``GKDTrainer`` generates from."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        batch = collate_sft(examples, self.pad_token_id, with_prompts=True)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"],
                "prompts": batch["prompt_input_ids"], "prompt_attention_mask": batch["prompt_attention_mask"]}


# ---- lit_distill ------------------------------------------------------------------------------------------------
def build_module(workload: Workload, options: Options, on_policy: bool):
    from lit_distill.models.loading import ModelSpec
    from lit_distill.modules import DistillModule
    from lit_distill.rollout import Sampling

    trainers.seed(options)
    return DistillModule(student=ModelSpec(name_or_path=workload.model("student"), tokenizer=workload.tokenizer,
                                           compile=options.compile),
                         teacher=ModelSpec(name_or_path=workload.model("teacher"), tokenizer=workload.tokenizer),
                         divergence="forward_kl", temperature=1.0, alpha=0.0,
                         on_policy_fraction=1.0 if on_policy else 0.0, prompt_tokens=options.max_length,
                         sampling=Sampling(max_new_tokens=options.new_tokens, temperature=1.0), seed=options.seed,
                         optimizer=trainers.adamw(options))


def datamodule(workload: Workload, options: Options, on_policy: bool) -> SFTRowsDataModule:
    return SFTRowsDataModule(workload.rows("sft"), workload.tokenizer, options.max_length, options.batch_size,
                             prompts_only=on_policy, num_workers=0, seed=options.seed)


def ours(workload: Workload, options: Options, on_policy: bool) -> float:
    return trainers.lightning_fit(build_module(workload, options, on_policy), datamodule(workload, options, on_policy),
                                  options)


# ---- TRL --------------------------------------------------------------------------------------------------------
def build_trl_trainer(workload: Workload, options: Options, on_policy: bool, clock: timing.StepClock):
    """A ``GKDTrainer`` on the same models, rows (in lit_distill's order) and settings."""
    from transformers import AutoTokenizer

    warnings.filterwarnings("ignore", message=r"You are importing from 'trl\.experimental'")  # known, chosen
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    # GKD warns that lambda = 1, T = 1 is also DistillationTrainer's territory: by design here.
    logging.getLogger("trl.experimental.gkd.gkd_trainer").setLevel(logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(workload.tokenizer)
    examples = encode_rows(workload.rows("sft"), tokenizer, options.max_length)
    dataset = trainers.rows_dataset(examples, trainers.training_order(len(examples), options), EXAMPLE_COLUMNS)
    config = GKDConfig(**trainers.trl_common_args(options), lmbda=1.0 if on_policy else 0.0, beta=0.0,
                       temperature=1.0, max_new_tokens=options.new_tokens, seq_kd=False, disable_dropout=True,
                       model_init_kwargs={"dtype": "float32"}, teacher_model_init_kwargs={"dtype": "float32"})
    return GKDTrainer(model=workload.model("student"), teacher_model=workload.model("teacher"), args=config,
                      data_collator=GKDCollator(tokenizer.pad_token_id), train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[timing.hf_clock(clock)])


MEASUREMENTS = [
    Measurement("kd_off_policy", partial(ours, on_policy=False),
                trainers.trl_measurement(build_trl_trainer, on_policy=False)),
    Measurement("kd_on_policy", partial(ours, on_policy=True),
                trainers.trl_measurement(build_trl_trainer, on_policy=True)),
]
