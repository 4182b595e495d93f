"""A teacher that is a causal LM in this process: batched KV-cached generation with ``lit_distill.rollout``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch

from lit_distill.data.chat import format_prompt
from lit_distill.data.collate import tokenize
from lit_distill.models.loading import ModelSpec, build_model, count_parameters, eos_token_ids, load_tokenizer
from lit_distill.rollout import generate, left_pad, rollout_generator
from lit_distill.teachers.base import AnswerCallback, Teacher, identity_string


class LocalTeacher(Teacher):
    """Answer questions with any causal LM the framework loads (hub id, local directory, GGUF alias, pico config).

    The model is frozen and in eval mode. It stays on the CPU until :meth:`to` moves it (a LightningModule does
    so in ``setup``, to its own device: a teacher is no submodule, so Lightning does not move it).

    Args:
        model: what to load, as for students (see :class:`lit_distill.models.ModelSpec`).
        max_new_tokens: longest answer in tokens.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling mass in (0, 1] (sampling only).
        chat_template: ``"default"``, ``"none"`` or a Jinja file, as in :func:`lit_distill.data.chat.format_prompt`.
        system_prompt: optional system message before each question.
        batch_size: questions generated together.
        stop_strings: an answer ends before the first of these strings.
        seed: seed of the sampling (call ``k`` of :meth:`answer` draws from ``rollout_generator(seed, 0, k)``).
        device: where to put the model now (``"cuda"``, ``"cpu"``, ...); None: the CPU.
    """

    def __init__(self, model: ModelSpec, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 chat_template: str = "default", system_prompt: str | None = None, batch_size: int = 16,
                 stop_strings: Sequence[str] = (), seed: int = 0, device: str | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.stop_strings = list(stop_strings)
        self.seed = seed
        self.tokenizer = load_tokenizer(model.tokenizer or model.name_or_path, trust_remote_code=model.trust_remote_code)
        self.model = build_model(model, self.tokenizer).eval().requires_grad_(False)
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        self._calls = 0  # answer() calls so far: each draws from its own random stream
        if device is not None:
            self.to(device)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def identity(self) -> str:
        """The model spec, prompt formatting and decoding settings (seed and top-p only when sampling).

        A local path names the weights by where they are: overwrite them and the cache key stays the same.
        """
        fields = {"model": asdict(self.spec), "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                  "chat_template": self.chat_template, "system_prompt": self.system_prompt,
                  "stop_strings": self.stop_strings}
        if self.sampling:
            fields.update(top_p=self.top_p, seed=self.seed)
        return identity_string("local", **fields)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> LocalTeacher:
        """Move the model to ``device``; returns self."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def answer(self, questions: list[str], on_answer: AnswerCallback | None = None) -> list[str]:
        """Generate an answer to each question, ``batch_size`` at a time (see :meth:`Teacher.answer`)."""
        prompts = [tokenize(self.tokenizer, format_prompt(self.tokenizer, question, self.chat_template,
                                                          self.system_prompt)) for question in questions]
        # Questions of similar length share a batch: less padding to run through the model.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        generator = rollout_generator(self.seed, 0, self._calls, self.device) if self.sampling else None
        self._calls += 1
        answers = [""] * len(questions)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in rows], self.tokenizer.pad_token_id)  # (B, P)
            rollout = generate(self.model, input_ids.to(self.device), attention_mask.to(self.device),
                               max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_token_ids,
                               pad_token_id=self.tokenizer.pad_token_id, temperature=self.temperature or 1.0,
                               top_p=self.top_p, do_sample=self.sampling, generator=generator,
                               stop_strings=self.stop_strings, tokenizer=self.tokenizer)
            for row, ids, mask in zip(rows, rollout.completions, rollout.completion_mask):
                text = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                answers[row] = _cut_at_stop(text, self.stop_strings).strip()
                if on_answer is not None:
                    on_answer(row, answers[row])
        return answers


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (the token that completed it may run past it)."""
    cut = min((position for stop in stop_strings if (position := text.find(stop)) >= 0), default=len(text))
    return text[:cut]
