"""Reward modelling (Bradley–Terry on pairs): lit_distill's ``RewardModule`` against TRL's ``RewardTrainer``.

Both sides train the workload's ``policy`` backbone (fp32) with a new scalar head on ``preference.jsonl``: the same
rows (all but the first, which lit_distill's DataModule must hold out as its validation split; TRL gets the same
train rows), in the same order (``trainers.training_order``), batch ``options.batch_size`` of pairs, chosen and
rejected in one (2B, T) forward pass, right-padded to the longest sequence of the batch, the score read at the last
real token (the EOS), loss −log σ(r_c − r_r) averaged over pairs, no reward centering, and the settings of
``lit_distill.bench.trainers`` (AdamW, constant LR, clipping at 1.0, no evaluation or checkpoints, ...).

What still differs, and why it stays:

* The head. lit_distill runs the causal LM (``AutoModelForCausalLM``) up to its output head, which it skips
  (``final_hidden_states``), and scores the hidden states with its own ``ScalarHead`` (Linear H → 1 *with* a bias,
  std 1/√(H + 1)); TRL loads ``AutoModelForSequenceClassification(num_labels=1)``, which has no LM head, and scores
  with ``score`` (Linear H → 1, no bias, std ``initializer_range`` = 0.02). The heads start from different random
  weights; both start at a loss of about log 2.
* Tokenisation. lit_distill tokenises prompt, completion and a final EOS id separately and concatenates them; TRL
  appends the EOS *text* to each completion and tokenises ``prompt + completion`` as one string. On this workload
  (prompts end with "?", completions start with a space) both give the same ids (checked by the tests).
* Over-long pairs. lit_distill cuts the prompt from the left to fit ``max_length``; TRL drops the pair. No pair of
  the workload reaches ``max_length`` at its default (64), so both train the same rows.
* Dropout. lit_distill keeps the backbone in train mode, TRL disables dropout; the workload's Llamas have none.
* Metric bookkeeping. lit_distill computes its five statistics on the device every step but logs them (and a
  tokens/s figure) only every ``LOGGING_STEPS`` steps (``log_step_metrics``), with no host sync of its own; TRL's
  loss function takes six ``.item()``-s every step (token count, min/mean/max reward, accuracy, margin), and the HF
  loop checks the loss for NaN/inf on the host every step
  (``logging_nan_inf_filter``). Each is its framework's default behaviour, and part of what is measured.
"""

from __future__ import annotations

from lit_distill.bench import timing, trainers
from lit_distill.bench.workload import Measurement, Options, Workload

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def preference_datamodule(workload: Workload, options: Options):
    """lit_distill's DataModule of the workload's preference pairs: the first row held out, the rest trained on."""
    from lit_distill.data import JSONLPreferenceDataModule

    num_rows = len(workload.read("preference"))
    return JSONLPreferenceDataModule(source=workload.rows("preference"), tokenizer=workload.tokenizer,
                                     max_length=options.max_length, batch_size=options.batch_size,
                                     validation_fraction=trainers.validation_fraction(num_rows), num_workers=0,
                                     seed=options.seed)


def trl_preference_dataset(workload: Workload, options: Options):
    """The rows lit_distill trains on, in the order it draws them, as a ``datasets.Dataset`` for TRL."""
    train = workload.read("preference")[1:]  # the first row is lit_distill's validation split
    return trainers.rows_dataset(train, trainers.training_order(len(train), options), PREFERENCE_COLUMNS)


def build_module(workload: Workload, options: Options):
    from lit_distill.models.loading import ModelSpec
    from lit_distill.modules import RewardModule

    trainers.seed(options)
    return RewardModule(model=ModelSpec(name_or_path=workload.model("policy"), tokenizer=workload.tokenizer,
                                        compile=options.compile),
                        center_coefficient=0.0, optimizer=trainers.adamw(options))


def ours(workload: Workload, options: Options) -> float:
    return trainers.lightning_fit(build_module(workload, options), preference_datamodule(workload, options), options)


def build_trl_trainer(workload: Workload, options: Options, clock: timing.StepClock):
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(**trainers.trl_common_args(options), max_length=options.max_length,
                          center_rewards_coefficient=None, disable_dropout=True)
    # A model path: TRL seeds, then loads AutoModelForSequenceClassification(num_labels=1) in fp32 itself.
    return RewardTrainer(model=workload.model("policy"), args=config,
                         train_dataset=trl_preference_dataset(workload, options),
                         processing_class=AutoTokenizer.from_pretrained(workload.tokenizer),
                         callbacks=[timing.hf_clock(clock)])


MEASUREMENTS = [Measurement("reward", ours=ours, trl=trainers.trl_measurement(build_trl_trainer))]
