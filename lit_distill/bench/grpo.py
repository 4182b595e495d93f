"""GRPO with a verifiable reward: lit_distill's ``GRPOModule`` against TRL's ``GRPOTrainer``.

Both sides train the workload's ``policy`` (fp32) on ``prompts.jsonl`` (raw prompts, no chat template), rewarded by
lit_distill's ``ArithmeticReward`` (1 if the first number of the completion is the row's ``answer``, else 0; TRL
calls it through a plain function, since TRL takes any ``nn.Module`` for a reward *model*), with per optimizer step:

* ``options.batch_size`` prompts (lit_distill: the DataModule's ``batch_size``; TRL: ``per_device_train_batch_size``
  = prompts × G completions, ``steps_per_generation=1``), the same rows in the same order (the first row is
  lit_distill's validation split and trained by neither; TRL reads the train rows in lit_distill's order,
  ``shuffle_dataset=False``);
* G = ``options.num_generations`` completions per prompt, sampled at temperature 1, top-k 0, top-p 1, at most
  ``options.new_tokens`` tokens each, by the KV-cached generator of each side (lit_distill's ``rollout.generate``,
  TRL's ``model.generate``): one generation round per optimizer step, one update per round (μ = 1, so the "old"
  log-probs are the current ones detached on both sides: no extra forward);
* advantages: the reward minus its group's mean over the group's std + 1e-4 (``scale_rewards="group"``), 0 for a
  group of equal rewards;
* loss ``dapo`` (TRL 1.16's default): the clipped surrogate (ε = 0.2 both ways) plus β · KL_k3(π ‖ π_ref) per token,
  summed over the step's completion tokens and divided by their number; β = ``BETA`` = 0.04 (GRPO's, and
  lit_distill's default; TRL's default is 0, which would drop the reference model from both sides), with TRL's
  ``use_bias_correction_kl`` off (it multiplies the KL term by the probability ratio, which lit_distill does not);
  the reference is a frozen copy of the initial policy, forwarded once per step on the rollout;
* one forward and backward of all prompts × G sequences, with the completion tokens' entropy computed for logging
  on both sides, and the settings of ``lit_distill.bench.trainers``; the clipping at 1.0 is ``GRPOModule``'s own
  (``max_grad_norm``; Lightning refuses ``gradient_clip_val`` under manual optimisation).

Differences that remain:

* The samples. Each side draws from its own random stream, so completions, rewards and the completion lengths differ
  (an EOS stops a row early; a sequence is padded to the longest completion of the batch). With the random tiny
  policy almost every completion runs the full ``new_tokens``, so the token counts per step match closely; the
  losses cannot be compared step by step.
* Prompt tokenisation. lit_distill tokenises the prompts once, in the DataModule; TRL tokenises the batch's prompt
  strings at every step (``_tokenize_prompts``) and pads the prompt and completion lists into tensors again after
  generating. Same ids (the tokenizer adds no special tokens).
* The reference. lit_distill deep-copies the loaded policy; TRL loads the policy directory a second time. Same
  weights.
* Per-step bookkeeping, each side its own: lit_distill ``record``-s about fifteen statistics and logs their means,
  plus a tokens/s figure (``int(...)`` of a tensor: a host sync); TRL takes a few dozen ``.item()``/``.tolist()``
  per step for its metrics (completion lengths, rewards, KL, entropy, clip ratios).
"""

from __future__ import annotations

from lit_distill.bench import timing, trainers
from lit_distill.bench.workload import Measurement, Options, Workload

BETA = 0.04
LOSS_TYPE = "dapo"
SCALE_REWARDS = "group"
CLIP_EPS = 0.2


def arithmetic_reward(prompts: list[str], completions: list[str], answer: list, **_) -> list[float]:
    """TRL's reward function: lit_distill's ``ArithmeticReward`` on the ``answer`` column."""
    from lit_distill.rewards import ArithmeticReward

    return ArithmeticReward()(prompts, completions, answer=answer)


# ---- lit_distill ------------------------------------------------------------------------------------------------
def build_module(workload: Workload, options: Options):
    from lit_distill.models.loading import ModelSpec
    from lit_distill.modules import GRPOModule
    from lit_distill.rewards import ArithmeticReward
    from lit_distill.rollout import Sampling

    trainers.seed(options)
    return GRPOModule(policy=ModelSpec(name_or_path=workload.model("policy"), tokenizer=workload.tokenizer,
                                       compile=options.compile),
                      rewards=[ArithmeticReward()], num_generations=options.num_generations, beta=BETA,
                      loss_type=LOSS_TYPE, scale_rewards=SCALE_REWARDS, clip_eps=CLIP_EPS, num_iterations=1,
                      mask_truncated_completions=False,
                      sampling=Sampling(max_new_tokens=options.new_tokens, temperature=1.0, top_k=0, top_p=1.0),
                      micro_batch_size=None, max_grad_norm=1.0, seed=options.seed, optimizer=trainers.adamw(options))


def datamodule(workload: Workload, options: Options):
    """The prompts of ``prompts.jsonl``: the first row held out, the rest trained on, ``options.batch_size`` a step."""
    from lit_distill.data import JSONLPromptDataModule

    return JSONLPromptDataModule(path=workload.rows("prompts"), tokenizer=workload.tokenizer, chat_template="none",
                                 max_prompt_length=options.max_length,
                                 validation_fraction=trainers.validation_fraction(len(workload.read("prompts"))),
                                 batch_size=options.batch_size, num_workers=0, seed=options.seed)


def ours(workload: Workload, options: Options) -> float:
    # GRPOModule clips and steps itself (manual optimisation), at max_grad_norm = 1.0.
    return trainers.lightning_fit(build_module(workload, options), datamodule(workload, options), options,
                                  gradient_clip_val=None)


# ---- TRL --------------------------------------------------------------------------------------------------------
def build_trl_trainer(workload: Workload, options: Options, clock: timing.StepClock):
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    train = workload.read("prompts")[1:]  # the first row is lit_distill's validation split
    dataset = trainers.rows_dataset(train, trainers.training_order(len(train), options), ("prompt", "answer"))
    completions = options.batch_size * options.num_generations
    config = GRPOConfig(**{**trainers.trl_common_args(options), "per_device_train_batch_size": completions},
                        steps_per_generation=1, num_generations=options.num_generations,
                        max_completion_length=options.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                        beta=BETA, loss_type=LOSS_TYPE, scale_rewards=SCALE_REWARDS, epsilon=CLIP_EPS,
                        num_iterations=1, mask_truncated_completions=False, use_bias_correction_kl=False,
                        shuffle_dataset=False, disable_dropout=True, log_completions=False, use_vllm=False,
                        model_init_kwargs={"dtype": "float32"})
    return GRPOTrainer(model=workload.model("policy"), reward_funcs=[arithmetic_reward], args=config,
                       train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(workload.tokenizer),
                       callbacks=[timing.hf_clock(clock)])


MEASUREMENTS = [Measurement("grpo", ours=ours, trl=trainers.trl_measurement(build_trl_trainer))]
