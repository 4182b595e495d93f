"""A small Python API over :class:`~lit_distill.modules.AgentModule` and a Lightning Trainer, for scripts and
notebooks::

    from lit_distill import DistillationAgent
    from lit_distill.teachers import LocalTeacher
    from lit_distill.data import QuestionDataModule
    from lit_distill.models.loading import ModelSpec

    agent = DistillationAgent(teacher=LocalTeacher(ModelSpec("lit-distill/tiny-teacher"), chat_template="none",
                                                   stop_strings=["."]),
                              student=ModelSpec(tokenizer="lit-distill/tokenizer", config={"model_type": "pico_transformer"}),
                              questions=QuestionDataModule(embedded="arithmetic_statements"),
                              reward_threshold=1.0, similarity="exact")
    agent.train(num_episodes=200, questions_per_episode=32)   # call again to continue (fresh optimizer)
    print(agent.evaluate())
    agent.save_student("runs/my_student")

An episode is one training step: ``questions_per_episode`` questions answered by both models, then one update.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L

from lit_distill.data import QuestionDataModule
from lit_distill.models.loading import ModelSpec
from lit_distill.modules.agent import AgentModule
from lit_distill.teachers import Teacher


class DistillationAgent:
    """Teacher↔student question-answer distillation driven from Python.

    Args:
        teacher: any :class:`~lit_distill.teachers.Teacher`.
        student: the model to train.
        questions: where the questions come from; default: the embedded SQuAD-shaped questions.
        reward_threshold: similarity at which a student answer counts as correct.
        accelerator: Lightning accelerator for :meth:`train` (``"auto"``, ``"cpu"``, ``"gpu"``).
        **module_args: any other :class:`~lit_distill.modules.AgentModule` argument (``similarity``,
            ``teacher_cache``, ``sampling``, ``optimizer``, ...).
    """

    def __init__(self, teacher: Teacher, student: ModelSpec, questions: Optional[QuestionDataModule] = None,
                 reward_threshold: float = 0.8, accelerator: str = "auto", **module_args: Any):
        self.module = AgentModule(student=student, teacher=teacher, reward_threshold=reward_threshold, **module_args)
        self.questions = questions or QuestionDataModule(embedded="qa", tokenizer=student.tokenizer
                                                         or student.name_or_path)
        self.accelerator = accelerator

    def trainer(self, **settings: Any) -> L.Trainer:
        defaults = dict(accelerator=self.accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        return L.Trainer(**{**defaults, **settings})

    def train(self, num_episodes: int, questions_per_episode: int = 32) -> dict[str, float]:
        """Run ``num_episodes`` training steps of ``questions_per_episode`` questions; returns the last step's
        metrics (``agent/accuracy_vs_teacher``, ``agent/cumulative_reward``, ...)."""
        self.questions.hparams.batch_size = questions_per_episode
        trainer = self.trainer(max_steps=num_episodes, limit_val_batches=0)
        trainer.fit(self.module, datamodule=self.questions)
        return {name: value.item() for name, value in trainer.callback_metrics.items()}

    def evaluate(self, max_batches: Optional[int] = None) -> dict[str, float]:
        """Greedy accuracy vs the teacher (and vs gold answers when known) on the validation questions."""
        self.questions.setup("validate")
        self.module.trainer = self.trainer()  # evaluate() reads the rank and step from a trainer
        return self.module.evaluate(self.questions.val_dataloader(), max_batches=max_batches)

    def save_student(self, path: str) -> None:
        """Save the student (and its tokenizer) in Hugging Face format."""
        self.module.save_pretrained(path)
