"""Logit knowledge distillation: a frozen teacher's token distributions teach a trainable student.

Off-policy batches come from the data: loss = alpha·CE(labels) + (1 − alpha)·T²·D(teacher ‖ student).
On-policy batches (GKD, Agarwal et al. 2024), drawn with probability ``on_policy_fraction``: the student
completes the first ``prompt_tokens`` tokens of each example itself (KV-cached sampling), and only the
divergence is taken on its own completion tokens — cross-entropy on self-generated text would teach nothing.

Offline (``logit_cache``): the teacher's top-k log-probabilities on the training and validation data are read
from a cache built once (``python -m lit_distill cache-teacher``, or here in ``setup`` when the cache is
missing), and the divergence is the top-k-plus-tail one of ``losses.topk_kd_loss``; no teacher is loaded.

Cross-tokenizer (``cross_tokenizer``): the teacher may use another vocabulary. Each row's real tokens are decoded to
text, which the teacher tokenizes itself; character offsets give the positions where both tokenizations start a
token at the same boundary (``losses.span_starts``), and there ULD or the vocabulary-mapped KL of
``losses.cross_tokenizer_loss`` compares the two next-token distributions. The alignment is Python on the CPU, per
row: about T prefix decodes of the student's tokens (batched in the tokenizer's Rust code) and one teacher encode.
"""

from __future__ import annotations

import random
from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from lit_distill.checks import require
from lit_distill.data.collate import IGNORE_INDEX
from lit_distill.losses import (CROSS_TOKENIZER_METHODS, DIVERGENCES, build_first_token_map, build_vocab_map,
                                cross_tokenizer_loss, kd_loss, monotone_ends, span_starts, token_logprobs, topk_kd_loss)
from lit_distill.models.loading import ModelSpec, build_model, count_parameters, load_tokenizer
from lit_distill.models.forward import labelled_logits
from lit_distill.modules.base import CausalLMModule, default_optimizer
from lit_distill.optim import SchedulerCallable
from lit_distill.rollout import Sampling, left_pad, rollout_generator
from lit_distill.teachers.logit_cache import (CachedTeacherOutputs, LogitCache, LogitCacheSpec, build_logit_cache, cache_teacher,
                                              config_summary)

VOCAB_MAPS = ("exact", "first_token")  # cross_tokenizer_map


def divergence_weight(stats) -> torch.Tensor:
    """The positions a mean divergence is over: every labelled token, or the aligned ones across tokenizers."""
    return getattr(stats, "num_aligned", stats.num_tokens)


class DistillModule(CausalLMModule):
    data_task = "sft"  # what an HFDataModule serves this module
    frozen_modules = ("teacher",)
    eval_modules = ("teacher",)

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec] = None, *, divergence: str = "forward_kl",
                 temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5, chunk_size: Optional[int] = None,
                 on_policy_fraction: float = 0.0, prompt_tokens: int = 16, sampling: Sampling = Sampling(),
                 seed: int = 0, logit_cache: Optional[LogitCacheSpec] = None, cross_tokenizer: Optional[str] = None,
                 cross_tokenizer_top_k: Optional[int] = None, cross_tokenizer_map: str = "exact",
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: Optional[SchedulerCallable] = None,
                 save_dir: Optional[str] = None, merge_lora: bool = False):
        """
        Args:
            student: the trained model; its tokenizer is the run's tokenizer.
            teacher: the frozen model; ``teacher.dtype`` may be lower precision (its logits are upcast in the loss).
                With ``logit_cache`` it is not loaded, only checked against what the cache was built from (and
                not needed when the cache comes from ``logit_cache.endpoint``).
            divergence: one of ``lit_distill.losses.DIVERGENCES``.
            temperature: T dividing both logits; the divergence term is scaled by T².
            alpha: weight of the hard-label cross-entropy; ``1 − alpha`` weighs the divergence.
            beta: JSD interpolation / skew coefficient (see ``kd_loss``).
            chunk_size: tokens per chunk in the loss (bounds its memory); None = all at once.
            on_policy_fraction: probability λ that a training batch is completed by the student's own samples.
            prompt_tokens: prefix of each example kept as the prompt of an on-policy batch.
            sampling: how the student completes an on-policy batch (``sampling.temperature`` is the sampling
                temperature, apart from the loss's ``temperature``).
            seed: base seed of on-policy sampling (a stream per rank and step: :func:`rollout_generator`).
            logit_cache: train from the teacher's cached top-k log-probabilities (built in ``setup`` where missing)
                instead of running the teacher; needs ``on_policy_fraction`` 0.
            cross_tokenizer: allow a teacher with another tokenizer and compare the models at aligned positions with
                one of ``lit_distill.losses.CROSS_TOKENIZER_METHODS`` (``uld``, ``vocab_map``) instead of
                ``divergence``; ``beta`` and ``chunk_size`` do not apply. None: one shared vocabulary is required.
            cross_tokenizer_top_k: ULD's top-k truncation of the sorted probabilities (``uld_distance``); None
                sorts the full vocabularies.
            cross_tokenizer_map: how ``vocab_map`` moves teacher tokens onto student ids: ``exact`` (tokens with the
                same string, ``losses.build_vocab_map``; the rest of the teacher's mass is dropped) or
                ``first_token`` (every token onto the student's first token of its text,
                ``losses.build_first_token_map``).
        """
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, save_dir=save_dir, merge_lora=merge_lora)
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence '{divergence}' is not one of {DIVERGENCES}")
        require(temperature > 0, "temperature", temperature, "> 0 (both logits are divided by it)")
        require(0 <= alpha <= 1, "alpha", alpha, "in [0, 1] (the weight of the cross-entropy)")
        require(0 <= beta <= 1, "beta", beta, "in [0, 1]")
        require(chunk_size is None or chunk_size >= 1, "chunk_size", chunk_size, ">= 1 or null")
        if on_policy_fraction > 0:
            require(prompt_tokens >= 1, "prompt_tokens", prompt_tokens, ">= 1")
        if not 0.0 <= on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {on_policy_fraction}")
        if teacher is None and logit_cache is None:
            raise ValueError("DistillModule needs a teacher, or a logit_cache (with an endpoint) to learn from")
        if logit_cache is not None and on_policy_fraction > 0:
            raise ValueError("on_policy_fraction > 0 needs the live teacher to score the student's own samples; a "
                             "logit_cache holds the teacher's outputs on the data only: drop one of the two")
        if cross_tokenizer is not None:
            if cross_tokenizer not in CROSS_TOKENIZER_METHODS:
                raise ValueError(f"cross_tokenizer '{cross_tokenizer}' is not one of {CROSS_TOKENIZER_METHODS} (or null)")
            if logit_cache is not None or teacher is None:
                raise ValueError("cross_tokenizer needs a live teacher (its tokenizer reads the text); drop logit_cache")
        require(cross_tokenizer_top_k is None or cross_tokenizer_top_k >= 1, "cross_tokenizer_top_k",
                cross_tokenizer_top_k, ">= 1 or null")
        require(cross_tokenizer_map in VOCAB_MAPS and (cross_tokenizer_map == "exact" or cross_tokenizer == "vocab_map"),
                "cross_tokenizer_map", cross_tokenizer_map, f"one of {VOCAB_MAPS}; first_token with cross_tokenizer "
                "vocab_map only")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.sampling = Sampling.of(sampling)
        self.tokenizer = load_tokenizer(student.tokenizer or student.name_or_path)
        self.model = build_model(student, self.tokenizer).train()  # from_pretrained returns eval mode
        self.student_ppl, self.teacher_nll, self.mean_divergence = Perplexity(IGNORE_INDEX), MeanMetric(), MeanMetric()
        # The specs themselves: hparams hold their config dicts when the CLI builds the module.
        self.teacher_spec, self.logit_cache_spec = teacher, logit_cache
        self.logit_cache: Optional[LogitCache] = None  # opened in setup; its manifest names the teacher's tokenizer
        self.teacher = None if logit_cache else self._load_teacher(teacher, student)

    def _load_teacher(self, teacher: ModelSpec, student: ModelSpec):
        self.teacher_tokenizer = load_tokenizer(teacher.tokenizer or teacher.name_or_path)
        if self.hparams.cross_tokenizer is None and self.teacher_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(
                f"vocab mismatch: the teacher's tokenizer ({teacher.tokenizer or teacher.name_or_path}, "
                f"{len(self.teacher_tokenizer)} tokens) differs from the student's "
                f"({student.tokenizer or student.name_or_path}, {len(self.tokenizer)} tokens); logit "
                "distillation needs one shared vocabulary, or set cross_tokenizer: uld (or vocab_map)")
        model = build_model(teacher, self.teacher_tokenizer).eval().requires_grad_(False)
        if self.hparams.cross_tokenizer == "vocab_map":
            teacher_width = model.get_output_embeddings().weight.shape[0]
            vocab_map = (build_first_token_map(self.tokenizer, self.teacher_tokenizer, teacher_width)
                         if self.hparams.cross_tokenizer_map == "first_token" else
                         build_vocab_map(self.tokenizer.get_vocab(), self.teacher_tokenizer.get_vocab(), teacher_width))
            self.register_buffer("vocab_map", vocab_map, persistent=False)
        return model

    def setup(self, stage: str) -> None:
        """With a ``logit_cache``: build what it lacks (every rank shares the work), then open it."""
        spec, temperature = self.logit_cache_spec, self.hparams.temperature
        if spec is None or self.logit_cache is not None:
            return
        teacher = cache_teacher(spec, self.teacher_spec, self.tokenizer)
        datamodule, strategy = self.trainer.datamodule, self.trainer.strategy
        expected = build_logit_cache(spec, teacher, self.tokenizer, datamodule, temperature,
                                     device=strategy.root_device, rank=self.global_rank,
                                     world_size=self.trainer.world_size, barrier=strategy.barrier)
        self.logit_cache = LogitCache(spec.path, expected)

    def on_fit_start(self) -> None:
        student = (f"student {count_parameters(self.model):,} parameters "
                   f"({count_parameters(self.model, trainable_only=True):,} trainable)")
        if self.logit_cache is not None:
            self.print(f"{student}; teacher from the logit cache: {config_summary(self.logit_cache.manifest)}")
        else:
            self.print(f"teacher {count_parameters(self.teacher):,} parameters, {student}")

    # ---- loss ---------------------------------------------------------------------------------------------
    def distill_loss(self, batch: dict, alpha: float, reduction: str = "sum",
                     with_teacher_label_logprobs: bool = False):
        """The student's ``LabelledLogits`` (N, V), the teacher's log-prob of each label (N,; only when asked for,
        as evaluation does: training has no use for it, and from a live teacher it costs a pass over its logits),
        the loss and its stats on the causally shifted batch; the teacher is the live model or the logit cache.

        Both models run their output head on the N labelled positions only (``labelled_logits``): prompt, padding
        and last-position logits are never computed, nor copied out of a (B, T, V) tensor by the loss."""
        hp = self.hparams
        student = labelled_logits(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                  position_ids=batch.get("position_ids"))
        loss_args = dict(divergence=hp.divergence, temperature=hp.temperature, alpha=alpha, beta=hp.beta,
                         chunk_size=hp.chunk_size, reduction=reduction, vocab_size=len(self.tokenizer))
        if hp.cross_tokenizer is not None:
            return student, None, *self.aligned_teacher_loss(batch, student, alpha, reduction)
        if self.logit_cache is not None:
            cached = CachedTeacherOutputs(*(dense[student.mask] for dense in self.logit_cache.lookup(batch)))
            loss, stats = topk_kd_loss(student.logits, cached.topk_ids, cached.topk_logprobs, cached.tail_logprob,
                                       student.targets, **loss_args)
            return student, cached.label_logprob if with_teacher_label_logprobs else None, loss, stats
        with torch.no_grad():
            teacher_logits = labelled_logits(self.teacher, batch["input_ids"], batch["attention_mask"],
                                             batch["labels"], position_ids=batch.get("position_ids")).logits  # (N, V)
        loss, stats = kd_loss(student.logits, teacher_logits, student.targets, **loss_args)
        teacher_label_logprobs = (token_logprobs(teacher_logits, student.targets) if with_teacher_label_logprobs
                                  else None)
        return student, teacher_label_logprobs, loss, stats

    def aligned_teacher_loss(self, batch: dict, student, alpha: float, reduction: str):
        """The loss and stats of ``losses.cross_tokenizer_loss``: the teacher runs on its own tokenization of each
        row's text, its head only at the positions aligned with a labelled student position."""
        hp = self.hparams
        if "position_ids" in batch:
            raise ValueError("cross_tokenizer re-tokenizes each row as one text, but the data is packed (several "
                             "examples per row); set packing: false in the data config")
        flat_index = student.mask.flatten().cumsum(0).sub(1).view_as(student.mask).tolist()  # (B, T - 1) -> row of N
        scored, teacher_rows, aligned = student.mask.tolist(), [], []
        for row, (ids, mask) in enumerate(zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())):
            positions = [t for t, keep in enumerate(mask) if keep]
            student_ids = [ids[t] for t in positions]
            # Prefix decodes give each student token's character end in the decoded text, whatever produced the ids.
            prefixes = self.tokenizer.batch_decode([student_ids[: k + 1] for k in range(len(student_ids))],
                                                   skip_special_tokens=True, clean_up_tokenization_spaces=False)
            text = prefixes[-1] if prefixes else ""
            encoded = self.teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            teacher_ids = encoded["input_ids"]
            labels = [IGNORE_INDEX] * len(teacher_ids)
            pairs = span_starts(monotone_ends([len(p) for p in prefixes]),
                                monotone_ends([end for _, end in encoded["offset_mapping"]]))
            for i, j in pairs:  # student token i and teacher token j both follow the same text prefix
                if i >= 1 and j >= 1 and scored[row][positions[i] - 1]:
                    aligned.append(flat_index[row][positions[i] - 1])
                    labels[j] = teacher_ids[j]
            teacher_rows.append((teacher_ids, labels))
        width = max(1, max(len(ids) for ids, _ in teacher_rows))
        pad = self.teacher_tokenizer.pad_token_id
        teacher_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in teacher_rows], device=self.device)
        teacher_labels = torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in teacher_rows],
                                      device=self.device)  # (B, Tt)
        teacher_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in teacher_rows],
                                    device=self.device)
        with torch.no_grad():  # rows in (row, position) order, as `aligned` (the alignment is monotone)
            teacher_logits = labelled_logits(self.teacher, teacher_ids, teacher_mask, teacher_labels).logits  # (A, Vt)
        return cross_tokenizer_loss(student.logits, student.targets, torch.tensor(aligned, dtype=torch.long,
                                                                                   device=self.device),
                                    teacher_logits, method=hp.cross_tokenizer, temperature=hp.temperature,
                                    alpha=alpha, top_k=hp.cross_tokenizer_top_k,
                                    vocab_map=getattr(self, "vocab_map", None), reduction=reduction)

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        # Seeded by the step, so every rank makes the same choice and a resumed run makes the same choices.
        on_policy = random.Random(f"{hp.seed}-{self.global_step}-{batch_idx}").random() < hp.on_policy_fraction
        if on_policy:
            if "position_ids" in batch:
                raise ValueError("on_policy_fraction > 0 needs one prompt per row, but the data is packed (several "
                                 "examples per row); set packing: false in the data config")
            batch = self.student_completions(batch)
        _, _, loss_sum, stats = self.distill_loss(batch, alpha=0.0 if on_policy else hp.alpha)
        num_tokens = stats.num_tokens.clamp(min=1)
        self.log_step_metrics({"train/loss": loss_sum.detach() / num_tokens, "train/ce": stats.ce,
                               "kd/divergence": stats.divergence, "kd/on_policy": float(on_policy)})
        return self.step_normalised(loss_sum, stats.num_tokens)

    @torch.no_grad()
    def student_completions(self, batch: dict) -> dict:
        """Replace each example by its first ``prompt_tokens`` tokens plus the student's sampled completion;
        labels cover only the completion (up to and including EOS)."""
        hp = self.hparams
        # The first prompt_tokens real tokens of each row, left-padded whatever the batch's padding side.
        prompts = [ids[mask.bool()][: hp.prompt_tokens].tolist()
                   for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        prompt_ids, prompt_mask = (t.to(self.device) for t in left_pad(prompts, self.tokenizer.pad_token_id))
        rollout = self.complete(prompt_ids, prompt_mask, **self.sampling.generate_kwargs(),
                                generator=rollout_generator(hp.seed, self.global_rank, self.global_step,
                                                            self.device))
        labels = rollout.sequences.clone()  # (B, P + N)
        labels[:, : rollout.prompt_length] = IGNORE_INDEX
        labels[:, rollout.prompt_length:][rollout.completion_mask == 0] = IGNORE_INDEX
        return {"input_ids": rollout.sequences, "attention_mask": rollout.attention_mask, "labels": labels}

    # ---- evaluation ---------------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        self.evaluation_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluation_step(batch, "test")

    def evaluation_step(self, batch: dict, stage: str) -> None:
        student, teacher_label_logprobs, loss, stats = self.distill_loss(
            batch, self.hparams.alpha, reduction="mean", with_teacher_label_logprobs=True)
        self.student_ppl(student.logits[None].float(), student.targets[None])  # (1, N, V): all N positions scored
        if teacher_label_logprobs is not None:  # None across tokenizers: the teacher's tokens are not the labels
            self.teacher_nll.update(-teacher_label_logprobs)
        self.mean_divergence.update(stats.divergence, weight=divergence_weight(stats))
        tokens = int(stats.num_tokens)
        self.log_dict({f"{stage}/loss": loss, f"{stage}/ce": stats.ce}, batch_size=tokens, sync_dist=True)
        self.log_dict({f"{stage}/ppl": self.student_ppl, f"{stage}/kd_divergence": self.mean_divergence},
                      prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._log_teacher_ppl("val")

    def on_test_epoch_end(self) -> None:
        self._log_teacher_ppl("test")

    def _log_teacher_ppl(self, stage: str) -> None:
        """exp of the token-weighted mean teacher NLL (synced across ranks by the metric)."""
        if self.hparams.cross_tokenizer is not None:
            return
        self.log(f"{stage}/teacher_ppl", self.teacher_nll.compute().exp(), prog_bar=True)
        self.teacher_nll.reset()

    @torch.no_grad()
    def evaluate(self, dataloader, max_batches: Optional[int] = None) -> dict[str, float]:
        """Student and teacher perplexity and the mean divergence over ``dataloader`` (outside the Trainer loop)."""
        student_ppl = Perplexity(IGNORE_INDEX).to(self.device)
        teacher_nll, divergence = MeanMetric().to(self.device), MeanMetric().to(self.device)
        was_training = self.training
        self.eval()
        for batch in self.batches_on_device(dataloader, max_batches):
            student, teacher_label_logprobs, _, stats = self.distill_loss(
                batch, self.hparams.alpha, reduction="mean", with_teacher_label_logprobs=True)
            student_ppl.update(student.logits[None].float(), student.targets[None])
            if teacher_label_logprobs is not None:
                teacher_nll.update(-teacher_label_logprobs)
            divergence.update(stats.divergence, weight=divergence_weight(stats))
        self.train(was_training)
        result = {"student_ppl": student_ppl.compute().item(), "kd_divergence": divergence.compute().item()}
        if self.hparams.cross_tokenizer is None:
            result["teacher_ppl"] = teacher_nll.compute().exp().item()
        return result
