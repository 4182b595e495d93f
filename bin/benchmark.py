"""Benchmark the KD loss's peak memory, DistillModule's training throughput, the preference modules' training
throughput, the sampling engine's throughput and PPO/GRPO steps/s; prints a table per section.

    python bin/benchmark.py                                   # every section, defaults (~3 min on 2 CPU cores)
    python bin/benchmark.py --only kd_memory --chunk-sizes none,128,512 --json /tmp/bench.json
    python bin/benchmark.py --only throughput --device cuda --precision bf16-mixed --teacher smollm2-135m-instruct \\
        --student smollm2-135m-instruct --keep-layers 0,6,12,18,24,29 --batch-size 8 --chunk-size 1024
    python bin/benchmark.py --only preference --pref-steps 10 --pref-examples 400
    python bin/benchmark.py --only rollout --threads 1 --rollout-models tiny,llama,pico

kd_memory: forward + backward of ``kd_loss(..., reduction="mean")`` (forward KL, alpha 0.5) on random (B, T, V)
student and teacher logits, the student's with requires_grad, once per chunk size, each in a fresh subprocess
(so that one variant's freed or cached memory cannot hide another's peak).
  * peak extra MiB: peak memory during the forward + backward minus what the process held once the inputs
    (both logits and the labels) were allocated and written. It includes the gradient of the student logits, one
    logits-sized tensor (the header gives that size), which any implementation must produce.
    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` after the inputs (bytes held by tensors;
    the caching allocator's reserve is not counted).
    CPU: there is no allocator statistic, so it is the process's peak resident set (``ru_maxrss``, Linux) minus
    ``ru_maxrss`` right after the inputs were written. A tiny ``kd_loss`` call runs before the inputs are
    allocated, so one-off costs (thread pools, kernel set-up) are part of the baseline, and the inputs, allocated
    last, make that baseline the process's current size. The workers run with glibc's
    ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, so every tensor block of 1 MiB or more is mapped on allocation and
    unmapped when freed, and the RSS follows what tensors hold. Left dynamic, glibc raises the threshold up to
    32 MiB and keeps freed blocks below it in its heap: chunks of 64 rows (12 MiB intermediates) then measured
    0.75-1 logit more than with the fixed threshold, an allocator artefact that varies from run to run. CPU
    times therefore include zero-filling fresh pages for every block.
  * time s: the fastest of ``--repeats`` forward + backward passes.
  * |dloss|, max|dgrad|: a chunked variant's loss and student-logit gradient against an unchunked pass on the same
    inputs, run in the same process after the peak was read; they differ only by summation order.

throughput: a Lightning Trainer fits DistillModule for ``--warmup-steps`` + ``--steps`` optimizer steps on
``WikiTextDataModule(source="embedded")``; tokens/s = steps * batch * block / wall time of the last ``--steps``
steps (the whole loop: data, teacher forward, student forward + backward, clipping, AdamW). Then, on one training
batch outside the Trainer (medians of 5): teacher fwd ms, the teacher's no-grad forward; distill fwd+bwd ms,
``DistillModule.distill_loss`` (both forwards and the KD loss) and its backward; student ms, their difference.
Defaults: teacher = the shipped ``lit-distill/tiny-teacher`` if it has been built, else a random model of its shape
(``configs/teacher/quickstart.yaml``); student = the student of ``configs/quickstart.yaml``.

preference: a Lightning Trainer fits RewardModule, then DPOModule with a live reference (a frozen copy of the policy,
``precompute_reference=False``), then DPOModule with ``precompute_reference=True`` (reference log-probs of every
train and validation pair computed once at fit start, then the reference is freed), each for ``--pref-warmup-steps``
+ ``--pref-steps`` optimizer steps on ``SQuADPreferenceDataModule(source="embedded",
embedded_examples=--pref-examples, batch_size=--pref-batch-size, max_length=128)``, logger and validation off.
steps/s and pairs/s (pairs = steps * batch) are over the wall time of the last ``--pref-steps`` steps (data, chosen
and rejected forwards, reference forward when live, backward, clipping, AdamW); setup s is the time from fit start
to the first training batch (for the precomputed variant, mostly the reference pass over every pair). Model: a random
Llama of the tiny teacher's shape (``configs/teacher/quickstart.yaml``: hidden 128, 4 layers) with
``lit-distill/tokenizer``, the same initial weights for every variant.

rollout: sampling throughput of ``lit_distill.rollout.generate`` against Hugging Face ``model.generate`` on the same
random-weight model and the same left-padded batch (``--rollout-batch-size`` prompts of ``--prompt-len`` // 2 ..
``--prompt-len`` random tokens), multinomial sampling at temperature 1 without top-k / top-p, at most
``--new-tokens`` new tokens each. Two scenarios: "no eos", EOS disabled (``eos_token_id=[]`` for ours,
``min_new_tokens=--new-tokens`` for HF's), so both produce exactly B * N tokens; "eos", the last V /
``--eos-fraction`` token ids are EOS ids, so completions end after about ``--eos-fraction`` tokens with geometric
spread, like RL completions of varied length (the two engines draw different random streams, hence different
lengths: compare tokens/s). Ours also records the sampled tokens' log-probs; HF's returns the tokens only.
tokens/s = completion tokens (up to and including EOS) / wall time of one call, median over ``--rollout-repeats``
calls (after one untimed call each, calls alternating between the engines); ours s / HF s: median time per call;
speed-up = our tokens/s / HF's. Models (``--rollout-models``): ``tiny`` (Llama of the quickstart student's shape:
hidden 64, 2 layers, vocab 1024), ``llama`` (hidden 256, 4 layers, 4 heads, vocab 1024), ``pico``
(``pico_transformer`` of the same shape) and, when asked for (slow on a CPU), ``gpt2`` (GPT-2 small's shape:
hidden 768, 12 layers, vocab 50257).

rl: a Lightning Trainer fits PPOModule (2 epochs × 2 minibatches = 4 updates per rollout, k1 KL to a frozen copy)
and GRPOModule (G = 4, one update per round, β = 0.04) on the shipped tiny teacher, ``--rl-batch-size`` embedded text
prompts per rollout (the first sentence of a corpus document), ``--rl-new-tokens`` sampled tokens at most, rewarded
by RepetitionPenalty (cheap: the timings are those of the algorithm, not of a reward model). After one untimed
rollout, ``--rl-rollouts`` are timed: rollouts/s, updates/s, and rollout tokens/s = completion tokens generated / time
spent in the rollout phase (sampling, rewards, old/reference log-probs and values).

Timings depend on everything else the machine runs; report the hardware and its load with them. On a CPU shared
with another job, ``--threads 1`` keeps torch's threads from waiting on each other (descheduled) at every op.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from lit_distill.losses import kd_loss

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = ("kd_memory", "throughput", "preference", "rollout", "rl")
DTYPES = ("float32", "bfloat16", "float16")  # torch attribute names, as ModelSpec.dtype
MIB = 2 ** 20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_chunk_size(text: str) -> Optional[int]:
    return None if text.lower() == "none" else int(text)


# ---- kd_memory ------------------------------------------------------------------------------------------------
def kd_pass(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
            chunk_size: Optional[int]) -> torch.Tensor:
    """One forward + backward of the loss; leaves the gradient in ``student.grad``, returns the detached loss."""
    student.grad = None  # a fresh gradient each pass, not an accumulation into the previous one
    loss, _ = kd_loss(student, teacher, labels, chunk_size=chunk_size, reduction="mean")
    loss.backward()
    return loss.detach()


def kd_worker(args: argparse.Namespace) -> dict:
    """Measure one chunk size (``args.kd_worker``) in this process, which must do nothing else."""
    device, dtype = torch.device(args.device), getattr(torch, args.kd_dtype)
    chunk_size = parse_chunk_size(args.kd_worker)
    generator = torch.Generator(device).manual_seed(0)

    def make_inputs(batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (batch, seq_len, args.vocab_size)
        student = torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_()
        teacher = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        labels = torch.randint(args.vocab_size, shape[:2], generator=generator, device=device)
        return student, teacher, labels

    kd_pass(*make_inputs(1, 8), chunk_size)  # one-off set-up costs go into the baseline
    student, teacher, labels = make_inputs(args.kd_batch_size, args.seq_len)  # randn writes every page
    synchronize(device)
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loss = kd_pass(student, teacher, labels, chunk_size)
        synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"chunk_size": chunk_size, "peak_extra_mib": (peak - baseline) / MIB, "time_s": min(times),
           "loss": loss.item(), "loss_diff": None, "grad_diff": None}
    if chunk_size is not None:
        grad = student.grad
        reference = kd_pass(student, teacher, labels, None)
        row["loss_diff"] = (loss - reference).abs().item()
        row["grad_diff"] = (grad - student.grad).abs().max().item()
    return row


def kd_memory(args: argparse.Namespace) -> list[dict]:
    """One fresh subprocess per chunk size (see the module docstring)."""
    rows = []
    for chunk_size in args.chunk_sizes:
        command = [sys.executable, __file__, "--kd-worker", str(chunk_size), "--device", args.device,
                   "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len),
                   "--kd-batch-size", str(args.kd_batch_size), "--kd-dtype", args.kd_dtype,
                   "--repeats", str(args.repeats)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB)}  # see the module docstring (glibc only)
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env)  # stderr shown
        rows.append(json.loads(result.stdout.splitlines()[-1]))
    return rows


def print_kd_memory(args: argparse.Namespace, rows: list[dict]) -> None:
    logits_mib = args.kd_batch_size * args.seq_len * args.vocab_size * getattr(torch, args.kd_dtype).itemsize / MIB
    method = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS (ru_maxrss)"
    print(f"KD loss forward+backward, B={args.kd_batch_size} T={args.seq_len} V={args.vocab_size} {args.kd_dtype} "
          f"logits ({logits_mib:.0f} MiB each), {method} above the inputs, fastest of {args.repeats}")
    print(f"{'chunk_size':>10}  {'peak extra MiB':>14}  {'x logits':>8}  {'time s':>7}  {'|dloss|':>8}  "
          f"{'max|dgrad|':>10}")
    for row in rows:
        diffs = ("-", "-") if row["loss_diff"] is None else (f"{row['loss_diff']:.1e}", f"{row['grad_diff']:.1e}")
        print(f"{str(row['chunk_size']):>10}  {row['peak_extra_mib']:14.0f}  "
              f"{row['peak_extra_mib'] / logits_mib:8.2f}  {row['time_s']:7.2f}  {diffs[0]:>8}  {diffs[1]:>10}")


# ---- throughput -----------------------------------------------------------------------------------------------
def model_specs(args: argparse.Namespace) -> tuple:
    """(teacher, student) ``ModelSpec``s from the command line, defaulting to the quickstart models."""
    import yaml

    from lit_distill.models.loading import ASSETS, ModelSpec

    if args.teacher:
        teacher = ModelSpec(name_or_path=args.teacher, dtype=args.teacher_dtype)
    elif (ASSETS / "tiny_teacher").is_dir():
        teacher = ModelSpec(name_or_path="lit-distill/tiny-teacher", dtype=args.teacher_dtype)
    else:  # not built yet: random weights, same shapes and speed
        config = yaml.safe_load((CONFIGS / "teacher" / "quickstart.yaml").read_text())
        shape = config["model"]["init_args"]["model"]
        teacher = ModelSpec(tokenizer=shape["tokenizer"], config=shape["config"], dtype=args.teacher_dtype)
    if args.student:
        student = ModelSpec(name_or_path=args.student, keep_layers=args.keep_layers)
    else:
        config = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
        student = ModelSpec(tokenizer=teacher.tokenizer or teacher.name_or_path,
                            config=config["model"]["init_args"]["student"]["config"])
    return teacher, student


def quiet_lightning() -> None:
    """Silence Lightning's banners and the warnings the benchmarked set-ups raise by design."""
    import logging
    import warnings

    from transformers.utils import logging as transformers_logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # accelerator banners and tips
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # frozen models, by design
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # inside Lightning


def step_timer(device: torch.device, warmup: int):
    """A Lightning callback timing optimizer steps ``warmup`` + 1 .. last (``end - start``), and the set-up from fit
    start to the first training batch (``setup_s``)."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self):
            self.warmup, self.start, self.end, self.fit_start, self.setup_s = warmup, 0.0, 0.0, 0.0, 0.0

        def on_fit_start(self, trainer, pl_module):  # callbacks run before the module's own on_fit_start
            self.fit_start = time.perf_counter()

        def on_train_start(self, trainer, pl_module):
            synchronize(device)
            self.setup_s = time.perf_counter() - self.fit_start

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(device)
            if trainer.global_step == self.warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    return StepTimer()


def throughput(args: argparse.Namespace) -> dict:
    # Imported here, not at the top, so that the kd_memory workers load only torch.
    import lightning as L

    from lit_distill.data import WikiTextDataModule
    from lit_distill.models.loading import count_parameters
    from lit_distill.modules import DistillModule
    from lit_distill.models.forward import causal_lm_logits

    device = torch.device(args.device)
    quiet_lightning()
    L.seed_everything(0, verbose=False)
    teacher, student = model_specs(args)
    module = DistillModule(student=student, teacher=teacher, chunk_size=args.chunk_size)
    data = WikiTextDataModule(source="embedded", tokenizer=student.tokenizer or student.name_or_path,
                              block_size=args.block_size, batch_size=args.batch_size)
    timer = step_timer(device, args.warmup_steps)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=args.precision,
                        max_steps=args.warmup_steps + args.steps, gradient_clip_val=1.0,  # as the shipped configs
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    train_s = timer.end - timer.start

    batch = {key: value.to(module.device) for key, value in next(iter(data.train_dataloader())).items()}

    def median_ms(step) -> float:
        step()  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    def teacher_forward() -> None:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            causal_lm_logits(module.teacher, batch["input_ids"], batch["attention_mask"])

    def distill_step() -> None:
        with trainer.precision_plugin.forward_context():
            loss = module.distill_loss(batch, alpha=module.hparams.alpha)[2]
        loss.backward()
        module.model.zero_grad(set_to_none=True)

    module.train()
    teacher_ms, distill_ms = median_ms(teacher_forward), median_ms(distill_step)
    return {"teacher": teacher.name_or_path or f"random {teacher.config['model_type']} (teacher quickstart shape)",
            "student": (f"{student.name_or_path} layers {student.keep_layers}" if student.keep_layers
                        else student.name_or_path or f"random {student.config['model_type']} (quickstart student)"),
            "teacher_params": count_parameters(module.teacher), "student_params": count_parameters(module.model),
            "vocab_size": len(module.tokenizer), "precision": str(args.precision), "chunk_size": args.chunk_size,
            "batch_size": args.batch_size, "block_size": args.block_size, "steps": args.steps, "time_s": train_s,
            "tokens_per_s": args.steps * args.batch_size * args.block_size / train_s,
            "teacher_fwd_ms": teacher_ms, "distill_fwd_bwd_ms": distill_ms, "student_ms": distill_ms - teacher_ms}


def print_throughput(result: dict) -> None:
    print(f"DistillModule training, teacher {result['teacher']} ({result['teacher_params']:,} params), student "
          f"{result['student']} ({result['student_params']:,} params), V={result['vocab_size']}, "
          f"B={result['batch_size']} T={result['block_size']}, precision {result['precision']}, "
          f"chunk_size {result['chunk_size']}")
    print(f"{'steps':>5}  {'time s':>7}  {'tokens/s':>9}  {'teacher fwd ms':>14}  {'distill fwd+bwd ms':>18}  "
          f"{'student ms':>10}")
    print(f"{result['steps']:5d}  {result['time_s']:7.2f}  {result['tokens_per_s']:9.0f}  "
          f"{result['teacher_fwd_ms']:14.1f}  {result['distill_fwd_bwd_ms']:18.1f}  {result['student_ms']:10.1f}")


# ---- preference -----------------------------------------------------------------------------------------------
def preference(args: argparse.Namespace) -> dict:
    import lightning as L
    import yaml

    from lit_distill.data import SQuADPreferenceDataModule
    from lit_distill.models.loading import ModelSpec, count_parameters
    from lit_distill.modules import DPOModule, RewardModule

    device = torch.device(args.device)
    quiet_lightning()
    shape = yaml.safe_load((CONFIGS / "teacher" / "quickstart.yaml").read_text())["model"]["init_args"]["model"]
    spec = ModelSpec(config=shape["config"], tokenizer="lit-distill/tokenizer")
    data = SQuADPreferenceDataModule(source="embedded", tokenizer="lit-distill/tokenizer",
                                     embedded_examples=args.pref_examples, batch_size=args.pref_batch_size,
                                     max_length=128)
    variants = {"RewardModule": lambda: RewardModule(model=spec),
                "DPOModule live reference": lambda: DPOModule(policy=spec, precompute_reference=False),
                "DPOModule precomputed reference": lambda: DPOModule(policy=spec, precompute_reference=True)}
    steps = args.pref_steps
    rows, params = [], 0
    for name, make in variants.items():
        L.seed_everything(0, verbose=False)  # the same initial weights and pair order for every variant
        module = make()
        params = count_parameters(module.model)
        timer = step_timer(device, args.pref_warmup_steps)
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                            precision=args.precision, max_steps=args.pref_warmup_steps + steps, gradient_clip_val=1.0,
                            limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
        trainer.fit(module, datamodule=data)
        if trainer.global_step != args.pref_warmup_steps + steps:
            raise RuntimeError(f"{name}: the epoch ended after {trainer.global_step} steps; raise --pref-examples")
        train_s = timer.end - timer.start
        rows.append({"module": name, "steps": steps, "time_s": train_s, "steps_per_s": steps / train_s,
                     "pairs_per_s": steps * args.pref_batch_size / train_s, "setup_s": timer.setup_s})
    return {"model": "random llama (tiny teacher shape)", "params": params, "vocab_size": len(data.tokenizer),
            "batch_size": args.pref_batch_size, "max_length": 128, "train_pairs": len(data.datasets["train"]),
            "precision": str(args.precision), "rows": rows}


def print_preference(result: dict) -> None:
    print(f"Preference training, {result['model']} ({result['params']:,} params), V={result['vocab_size']}, "
          f"B={result['batch_size']} pairs, max_length {result['max_length']}, {result['train_pairs']} train pairs "
          f"(embedded SQuAD), precision {result['precision']}")
    print(f"{'module':<32}  {'steps':>5}  {'time s':>7}  {'steps/s':>7}  {'pairs/s':>8}  {'setup s':>7}")
    for row in result["rows"]:
        print(f"{row['module']:<32}  {row['steps']:5d}  {row['time_s']:7.2f}  {row['steps_per_s']:7.2f}  "
              f"{row['pairs_per_s']:8.1f}  {row['setup_s']:7.2f}")


# ---- rollout --------------------------------------------------------------------------------------------------
ROLLOUT_MODELS = ("tiny", "llama", "pico", "gpt2")
DEFAULT_ROLLOUT_MODELS = ["tiny", "llama", "pico"]  # gpt2 takes minutes per engine on a CPU


def rollout_model(name: str):
    """A random-weight causal LM in eval mode (see the module docstring for the shapes)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lit_distill.models.pico import (
        PicoTransformerConfig,
        PicoTransformerForCausalLM,
    )

    torch.manual_seed(0)
    if name == "tiny":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=192,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512))
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688,
                                             num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512))
    elif name == "pico":
        model = PicoTransformerForCausalLM(PicoTransformerConfig(vocab_size=1024, hidden_size=256,
                                                                 num_hidden_layers=4, num_attention_heads=4))
    else:
        model = GPT2LMHeadModel(GPT2Config())
    return model.eval()


def rollout_engines(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new: int, eos: list[int]) -> dict:
    """``{"ours": run, "hf": run}``: ``run(seed)`` samples one batch and returns its number of completion tokens
    (up to and including EOS). Without ``eos``, HF's ``min_new_tokens`` keeps it from stopping."""
    from lit_distill.rollout import generate

    def ours(seed: int) -> int:
        rollout = generate(model, input_ids, attention_mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=0,
                           generator=torch.Generator(input_ids.device).manual_seed(seed))
        return int(rollout.completion_lengths.sum())

    def hf(seed: int) -> int:
        torch.manual_seed(seed)
        completions = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                     max_new_tokens=new, min_new_tokens=0 if eos else new, top_k=0, top_p=1.0,
                                     temperature=1.0, eos_token_id=eos or 1, pad_token_id=0)[:, input_ids.size(1):]
        ended = torch.isin(completions, torch.tensor(eos, device=completions.device))  # (B, N)
        lengths = torch.where(ended.any(-1), ended.int().argmax(-1) + 1, completions.size(1))  # (B,)
        return int(lengths.sum())

    return {"ours": ours, "hf": hf}


def rollout(args: argparse.Namespace) -> dict:
    from lit_distill.models.loading import count_parameters

    device, dtype = torch.device(args.device), getattr(torch, args.rollout_dtype)
    batch, prompt_len, new = args.rollout_batch_size, args.prompt_len, args.new_tokens
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=generator)  # (B,)
    attention_mask = (torch.arange(prompt_len) >= prompt_len - lengths[:, None]).long().to(device)  # (B, P)
    input_ids = torch.randint(3, 1024, (batch, prompt_len), generator=generator).to(device) * attention_mask
    rows = []
    for name in args.rollout_models:
        model = rollout_model(name).to(device, dtype)
        vocab = model.config.vocab_size
        # "eos": the last V / eos_fraction ids end a completion, about one step in eos_fraction under these near-uniform
        # random models: geometric lengths, as varied as RL completions.
        scenarios = {"no eos": [], "eos": list(range(vocab - vocab // args.eos_fraction, vocab))}
        for scenario, eos in scenarios.items():
            engines = rollout_engines(model, input_ids, attention_mask, new, eos)
            times: dict = {engine: [] for engine in engines}
            rates: dict = {engine: [] for engine in engines}
            for repeat in range(args.rollout_repeats + 1):  # repeat 0 is an untimed warm-up
                for engine, run in engines.items():  # alternating, so that load changes hit both alike
                    start = time.perf_counter()
                    tokens = run(repeat)
                    synchronize(device)
                    elapsed = time.perf_counter() - start
                    if not eos and tokens != batch * new:
                        raise RuntimeError(f"{name}: {engine} generated {tokens} tokens, expected {batch * new}")
                    if repeat:
                        times[engine].append(elapsed)
                        rates[engine].append(tokens / elapsed)
            row = {"model": name, "scenario": scenario, "params": count_parameters(model), "vocab_size": vocab}
            for engine in engines:
                row[f"{engine}_s"] = statistics.median(times[engine])
                row[f"{engine}_tokens_per_s"] = statistics.median(rates[engine])
            row["speedup"] = row["ours_tokens_per_s"] / row["hf_tokens_per_s"]
            rows.append(row)
    return {"batch_size": batch, "prompt_len": prompt_len, "new_tokens": new, "dtype": args.rollout_dtype,
            "repeats": args.rollout_repeats, "eos_fraction": args.eos_fraction, "rows": rows}


# ---- rl -------------------------------------------------------------------------------------------------------
def rl(args: argparse.Namespace) -> dict:
    import lightning as L

    from lit_distill.data import JSONLPromptDataModule
    from lit_distill.models.loading import ModelSpec
    from lit_distill.modules import GRPOModule, PPOModule
    from lit_distill.rewards import RepetitionPenalty

    device = torch.device(args.device)
    quiet_lightning()
    policy = ModelSpec("lit-distill/tiny-teacher")
    common = {"policy": policy, "rewards": [RepetitionPenalty()], "max_new_tokens": args.rl_new_tokens}
    variants = {"PPOModule": lambda: PPOModule(**common, ppo_epochs=2, num_minibatches=2, kl_coef=0.05),
                "GRPOModule": lambda: GRPOModule(**common, num_generations=4, beta=0.04)}

    class RolloutTimer(L.Callback):
        def __init__(self):
            self.batch_s, self.rollout_s, self.tokens, self.start = [], [], [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(device)
            if batch_idx:  # the first rollout pays set-up
                metrics = trainer.callback_metrics
                sequences = len(batch["prompt"]) * getattr(pl_module.hparams, "num_generations", 1)
                self.batch_s.append(time.perf_counter() - self.start)
                self.rollout_s.append(metrics["perf/rollout_s"].item())
                self.tokens.append(metrics["rollout/completion_length"].item() * sequences)

    rows = []
    for name, make in variants.items():
        L.seed_everything(0, verbose=False)
        module = make()
        data = JSONLPromptDataModule(embedded="text", num_embedded=args.rl_batch_size * (args.rl_rollouts + 2),
                                     batch_size=args.rl_batch_size)
        timer = RolloutTimer()
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                            max_steps=(args.rl_rollouts + 1) * module.updates_per_rollout(), limit_val_batches=0,
                            num_sanity_val_steps=0, log_every_n_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
        trainer.fit(module, datamodule=data)
        total_s = sum(timer.batch_s)
        rows.append({"module": name, "rollouts": len(timer.batch_s), "time_s": total_s,
                     "rollouts_per_s": len(timer.batch_s) / total_s,
                     "updates_per_s": len(timer.batch_s) * module.updates_per_rollout() / total_s,
                     "rollout_tokens_per_s": sum(timer.tokens) / sum(timer.rollout_s),
                     "rollout_share": sum(timer.rollout_s) / total_s})
    return {"policy": "lit-distill/tiny-teacher", "prompts_per_rollout": args.rl_batch_size,
            "max_new_tokens": args.rl_new_tokens, "rows": rows}


def print_rl(result: dict) -> None:
    print(f"Online RL on {result['policy']}, {result['prompts_per_rollout']} prompts per rollout, "
          f"<= {result['max_new_tokens']} new tokens")
    print(f"{'module':<11}  {'rollouts/s':>10}  {'updates/s':>9}  {'rollout tok/s':>13}  {'rollout share':>13}")
    for row in result["rows"]:
        print(f"{row['module']:<11}  {row['rollouts_per_s']:10.2f}  {row['updates_per_s']:9.2f}  "
              f"{row['rollout_tokens_per_s']:13.0f}  {row['rollout_share']:12.0%}")


def print_rollout(result: dict) -> None:
    print(f"Sampling, random-weight models, B={result['batch_size']} prompts of <= {result['prompt_len']} tokens "
          f"(left-padded), <= {result['new_tokens']} new tokens each, {result['dtype']}, median of "
          f"{result['repeats']}; eos: 1/{result['eos_fraction']} of the vocabulary ends a completion")
    print(f"{'model':<6}  {'scenario':<8}  {'params':>11}  {'V':>6}  {'ours s':>7}  {'HF s':>7}  {'ours tok/s':>10}  "
          f"{'HF tok/s':>9}  {'speed-up':>8}")
    for row in result["rows"]:
        print(f"{row['model']:<6}  {row['scenario']:<8}  {row['params']:11,d}  {row['vocab_size']:6d}  "
              f"{row['ours_s']:7.3f}  {row['hf_s']:7.3f}  {row['ours_tokens_per_s']:10.0f}  "
              f"{row['hf_tokens_per_s']:9.0f}  {row['speedup']:7.2f}x")


# ---- command line ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=SECTIONS, help="run one section (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's); on a CPU shared with another job, 1 avoids "
                             "threads waiting on each other at every op")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to this JSON file")
    kd = parser.add_argument_group("kd_memory")
    kd.add_argument("--chunk-sizes", type=lambda text: [parse_chunk_size(c) for c in text.split(",")],
                    default=[None, 256, 1024], help="comma-separated tokens per chunk; 'none' = unchunked "
                                                    "(default: none,256,1024)")
    kd.add_argument("--vocab-size", type=int, default=50257, help="default: GPT-2's vocabulary")
    kd.add_argument("--seq-len", type=int, default=512)
    kd.add_argument("--kd-batch-size", type=int, default=4)
    kd.add_argument("--kd-dtype", choices=DTYPES, default="float32",
                    help="dtype of both logits (the loss upcasts to fp32 inside)")
    kd.add_argument("--repeats", type=int, default=1, help="timed forward+backward passes per chunk size")
    kd.add_argument("--kd-worker", metavar="CHUNK", help=argparse.SUPPRESS)  # internal: one variant, prints JSON
    tp = parser.add_argument_group("throughput")
    tp.add_argument("--teacher", metavar="NAME_OR_PATH",
                    help="teacher model (hub id, directory, .gguf or alias); default: the quickstart teacher")
    tp.add_argument("--teacher-dtype", choices=DTYPES, default="float32")
    tp.add_argument("--student", metavar="NAME_OR_PATH",
                    help="student model; default: the quickstart student (random) with the teacher's tokenizer")
    tp.add_argument("--keep-layers", type=lambda text: [int(i) for i in text.split(",")],
                    help="comma-separated decoder layers of --student to keep, e.g. 0,6,12,18,24,29")
    tp.add_argument("--chunk-size", type=parse_chunk_size, default=None,
                    help="DistillModule's KD loss chunk size in tokens (default: none)")
    tp.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    tp.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (>= 1: step 1 pays set-up)")
    tp.add_argument("--batch-size", type=int, default=16)
    tp.add_argument("--block-size", type=int, default=128)
    tp.add_argument("--precision", default="32-true", help="Lightning Trainer precision, e.g. bf16-mixed on GPUs")
    pref = parser.add_argument_group("preference (also uses --precision)")
    pref.add_argument("--pref-steps", type=int, default=6, help="timed optimizer steps per module")
    pref.add_argument("--pref-warmup-steps", type=int, default=2, help="untimed steps first (>= 1)")
    pref.add_argument("--pref-batch-size", type=int, default=16, help="pairs per batch")
    pref.add_argument("--pref-examples", type=int, default=200,
                      help="embedded SQuAD training examples (enough for warm-up + timed steps in one epoch)")
    ro = parser.add_argument_group("rollout")
    ro.add_argument("--rollout-models", type=lambda text: text.split(","), default=DEFAULT_ROLLOUT_MODELS,
                    help=f"comma-separated, of {','.join(ROLLOUT_MODELS)} (default: {','.join(DEFAULT_ROLLOUT_MODELS)})")
    ro.add_argument("--rollout-batch-size", type=int, default=16, help="prompts per batch")
    ro.add_argument("--prompt-len", type=int, default=32, help="longest prompt (left-padded)")
    ro.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    ro.add_argument("--rollout-dtype", choices=DTYPES, default="float32", help="model weights' dtype")
    ro.add_argument("--rollout-repeats", type=int, default=5, help="timed calls per engine, model and scenario")
    ro.add_argument("--eos-fraction", type=int, default=16,
                    help="eos scenario: the last V / this many token ids are EOS (mean length about this many)")
    rl_group = parser.add_argument_group("rl")
    rl_group.add_argument("--rl-rollouts", type=int, default=5, help="timed rollouts per module (after one untimed)")
    rl_group.add_argument("--rl-batch-size", type=int, default=16, help="prompts per rollout")
    rl_group.add_argument("--rl-new-tokens", type=int, default=32, help="max new tokens per completion")
    args = parser.parse_args(argv)
    if args.rl_rollouts < 1:
        parser.error("--rl-rollouts must be >= 1")
    if unknown := set(args.rollout_models) - set(ROLLOUT_MODELS):
        parser.error(f"--rollout-models: unknown {sorted(unknown)}, expected some of {list(ROLLOUT_MODELS)}")
    if args.rollout_repeats < 1 or args.prompt_len < 2 or args.new_tokens < 1 or args.eos_fraction < 2:
        parser.error("--rollout-repeats and --new-tokens must be >= 1, --prompt-len and --eos-fraction >= 2")
    if args.pref_warmup_steps < 1 or args.pref_steps < 1:
        parser.error("--pref-warmup-steps and --pref-steps must be >= 1")
    if args.keep_layers and not args.student:
        parser.error("--keep-layers applies to --student, which is not set")
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup-steps and --steps must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kd_worker is not None:
        print(json.dumps(kd_worker(args)))
        return
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:  # CPU timings swing with what else runs: the load average goes with them
        device = (f"cpu ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, "
                  f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"torch {torch.__version__}, {device}\n")
    results: dict = {"torch": torch.__version__, "device": device}
    if args.only in (None, "kd_memory"):
        results["kd_memory"] = kd_memory(args)
        print_kd_memory(args, results["kd_memory"])
        print()
    if args.only in (None, "throughput"):
        results["throughput"] = throughput(args)
        print_throughput(results["throughput"])
        print()
    if args.only in (None, "preference"):
        results["preference"] = preference(args)
        print_preference(results["preference"])
        print()
    if args.only in (None, "rollout"):
        results["rollout"] = rollout(args)
        print_rollout(results["rollout"])
        print()
    if args.only in (None, "rl"):
        results["rl"] = rl(args)
        print_rl(results["rl"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
