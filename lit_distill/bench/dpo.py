"""DPO (sigmoid loss, β = 0.1, a live frozen reference): lit_distill's ``DPOModule`` against TRL's ``DPOTrainer``.

Both sides train the workload's ``policy`` (fp32) against a frozen reference with the policy's initial weights,
forwarded every step (no precomputed reference log-probs), on ``preference.jsonl``: the same train rows, in the same
order, batch ``options.batch_size`` of pairs (see ``lit_distill.bench.reward`` for how the rows are shared), chosen
and rejected in one (2B, T) forward pass of each model, right-padded to the longest sequence of the batch, summed
completion-token log-probs (EOS included), loss −log σ(β h) averaged over pairs, dropout off, and the settings of
``lit_distill.bench.trainers`` (AdamW, constant LR, clipping at 1.0, no evaluation or checkpoints, ...).

What still differs, and why it stays:

* The reference. lit_distill deep-copies the loaded policy; TRL loads the policy directory a second time
  (``from_pretrained``, its default when no ``ref_model`` is given). Same weights, same work per step.
* Log-probs. lit_distill materialises the (2B, T, V) logits of both models and gathers the label log-probs from
  them; TRL patches a fused, chunked LM head into both models (``add_fused_lm_head``) that never builds the full
  logits and also returns per-token entropy, mean logit and top-1 flags for its metrics.
* Tokenisation. lit_distill tokenises prompt, completion and a final EOS id separately and concatenates them; TRL
  appends the EOS *text* to each completion, tokenises the prompt and ``prompt + completion`` and splits them at
  their common prefix. On this workload both give the same ids (checked by the tests).
* Over-long pairs. lit_distill cuts the prompt from the left to fit ``max_length``; TRL cuts the end of each
  sequence (``truncation_mode="keep_start"``). No pair of the workload reaches ``max_length`` at its default (64).
* Train/eval mode. lit_distill keeps policy and reference in eval mode; TRL trains in train mode with every dropout
  probability set to 0. The same computation for the workload's Llamas (no dropout, no batch norm).
* Metric bookkeeping. lit_distill computes its seven statistics on the device every step but logs them (and a
  tokens/s figure) only every ``LOGGING_STEPS`` steps (``log_step_metrics``), with no host sync of its own; TRL's
  loss function takes about a dozen ``.item()``-s every step (entropy, token counts, mean logits, token accuracy,
  rewards, margins, log-probs), and the HF loop checks the loss for NaN/inf on the host every step
  (``logging_nan_inf_filter``). Each is its framework's default behaviour, and part of what is measured.
"""

from __future__ import annotations

from lit_distill.bench import timing, trainers
from lit_distill.bench.reward import preference_datamodule, trl_preference_dataset
from lit_distill.bench.workload import Measurement, Options, Workload

BETA = 0.1


def build_module(workload: Workload, options: Options):
    from lit_distill.models.loading import ModelSpec
    from lit_distill.modules import DPOModule

    trainers.seed(options)
    return DPOModule(policy=ModelSpec(name_or_path=workload.model("policy"), tokenizer=workload.tokenizer,
                                      compile=options.compile),
                     beta=BETA, loss_type="sigmoid", precompute_reference=False, optimizer=trainers.adamw(options))


def ours(workload: Workload, options: Options) -> float:
    return trainers.lightning_fit(build_module(workload, options), preference_datamodule(workload, options), options)


def build_trl_trainer(workload: Workload, options: Options, clock: timing.StepClock):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**trainers.trl_common_args(options), max_length=options.max_length,
                       truncation_mode="keep_start", beta=BETA, loss_type=["sigmoid"], label_smoothing=0.0,
                       precompute_ref_log_probs=False, disable_dropout=True)
    # A model path: TRL loads the policy in fp32, and the reference as a second load of the same directory.
    return DPOTrainer(model=workload.model("policy"), args=config,
                      train_dataset=trl_preference_dataset(workload, options),
                      processing_class=AutoTokenizer.from_pretrained(workload.tokenizer),
                      callbacks=[timing.hf_clock(clock)])


MEASUREMENTS = [Measurement("dpo", ours=ours, trl=trainers.trl_measurement(build_trl_trainer))]
