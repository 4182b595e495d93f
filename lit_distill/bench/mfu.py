"""Model FLOP utilisation of a KD training step: ``DistillModule`` in a Lightning Trainer against a naive PyTorch
loop doing the same step, and both against this machine's fp32 matmul peak.

``python -m lit_distill.bench mfu [--model smollm2]``: the workload's ``teacher/`` distils into its ``student/``
(``--model smollm2``: SmolLM2-135M-Instruct, 134.5 M parameters → its 6-layer cut, 49.6 M; ``tiny``: the random
hidden-256 × 4 → hidden-128 × 2 Llamas), fp32, batches of ``--mfu-batch-size`` × ``--mfu-seq-len`` tokens (B4 T128
by default), ``--warmup`` + ``--steps`` optimizer steps of AdamW (``trainers.adamw``: fused, ``--lr``, weight decay
0), gradient-norm clipping at 1.0, the loss ``alpha · CE + (1 − alpha) · T² · KL(p_teacher ‖ p_student)`` per token
with DistillModule's default alpha and T (0.5 and 1.0), averaged over the B · (T − 1) predicted tokens.

* peak GFLOP/s: the best over ``--mfu-peak-sizes`` of ``2 n³ / t`` for an fp32 (n × n) @ (n × n) ``torch.mm``, t the
  median time of ``torch.utils.benchmark.Timer.blocked_autorange`` at the current torch thread count.
* naive: the ~25-line loop a user would write (``naive_fit``): teacher no-grad forward, student forward, the loss
  above with ``F.cross_entropy`` and ``F.kl_div`` on ``log_softmax``, backward, ``clip_grad_norm_(1.0)``, AdamW step,
  ``zero_grad``. Both forwards pass ``use_cache=False`` (as ``causal_lm_logits`` does), so neither side builds a KV
  cache it would not read.
* lit_distill: ``DistillModule(divergence="forward_kl")`` with its defaults, fitted by ``trainers.lightning_fit``
  (``trainers.lightning_trainer``'s settings: fp32, clipping at 1.0, no logger, no checkpoints, ...).

Data, identical on both sides: the rows of ``sft.jsonl`` (prompt + completion + EOS) concatenated and cut into
rows of T tokens (no padding: every position is a real token and a label), the first ``warmup + steps`` batches of
B rows (the text repeats when it runs out), in the same order for both. Each round builds both models afresh from
the workload directories and runs the naive loop and then DistillModule (``timing.interleave``); speeds are timed
from the end of step ``warmup`` to the end of the last one (``timing.StepClock``), tokens/s = steps/s × B × T.

FLOPs: ``2 · N_teacher + 6 · N_student`` per token (forward 2N, backward 4N), N the parameters that multiply
activations: every ``nn.Linear`` weight, the LM head included (also when it is tied to the input embedding, since
the head is still a (V × d) matmul), the input embedding (a lookup) and the norms excluded. For SmolLM2 this N is
134.5 M and 49.5 M, the figures above up to the norms' 0.1 M. Attention's own score and value products
(``4 · layers · T · d`` per token forward, under 3 % of the total at T 128) are not counted, so MFU is slightly
conservative. achieved GFLOP/s = tokens/s × FLOPs/token; MFU = achieved / peak.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lit_distill.bench import timing, trainers
from lit_distill.bench.workload import Options, Workload

NEEDS_WORKLOAD = True


def parse_sizes(text: str) -> tuple[int, ...]:
    return tuple(int(size) for size in text.split(","))


@dataclass(frozen=True)
class Settings:
    batch_size: int = field(default=4, metadata={"help": "B, rows per batch"})
    seq_len: int = field(default=128, metadata={"help": "T, tokens per row"})
    peak_sizes: tuple[int, ...] = field(default=(1024, 2048, 4096),
                                        metadata={"parse": parse_sizes, "help": "comma-separated n of the n × n fp32 "
                                                                                 "matmuls timed for the peak"})
    peak_min_run_time: float = field(default=1.0, metadata={"help": "seconds of blocked_autorange per matmul size"})


def distill_defaults() -> tuple[float, float]:
    """DistillModule's default ``alpha`` and ``temperature``, read from its signature."""
    from lit_distill.modules import DistillModule

    parameters = inspect.signature(DistillModule.__init__).parameters
    return parameters["alpha"].default, parameters["temperature"].default


def matmul_parameters(model: nn.Module) -> int:
    """Weights of every ``nn.Linear`` (LM head included, tied or not): the N of 2N / 6N FLOPs per token."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))


def matmul_peak(settings: Settings, device: str) -> dict:
    """The best fp32 ``torch.mm`` GFLOP/s over ``settings.peak_sizes`` (median time of each size)."""
    from torch.utils.benchmark import Timer

    by_size = {}
    for n in settings.peak_sizes:
        a, b = (torch.randn(n, n, device=device) for _ in range(2))
        timer = Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b},
                      num_threads=torch.get_num_threads())  # Timer's default is 1 thread
        seconds = timer.blocked_autorange(min_run_time=settings.peak_min_run_time).median
        by_size[n] = 2 * n ** 3 / seconds / 1e9
    return {"gflops": max(by_size.values()), "by_size": by_size}


def token_batches(workload: Workload, settings: Settings, num_batches: int) -> list[dict]:
    """``num_batches`` batches of B rows of T tokens from the packed ``sft.jsonl`` text (see the module docstring)."""
    from lit_distill.models.loading import load_tokenizer

    tokenizer = load_tokenizer(workload.tokenizer)
    text = []
    for row in workload.read("sft"):
        text += tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
        text.append(tokenizer.eos_token_id)
    size = settings.batch_size * settings.seq_len
    stream = itertools.cycle(text)
    batches = []
    for _ in range(num_batches):
        input_ids = torch.tensor(list(itertools.islice(stream, size))).view(settings.batch_size, settings.seq_len)
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                        "labels": input_ids.clone()})  # (B, T) each
    return batches


def naive_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
               temperature: float) -> torch.Tensor:
    """``alpha · CE + (1 − alpha) · T² · KL(p_teacher ‖ p_student)``, mean over tokens; logits (B, T, V) already
    aligned with ``labels`` (B, T)."""
    student_logits, teacher_logits = student_logits.flatten(0, 1), teacher_logits.flatten(0, 1)  # (B·T, V)
    ce = F.cross_entropy(student_logits, labels.flatten())
    kl = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                  log_target=True, reduction="batchmean")  # sum over V, mean over tokens
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl


def naive_fit(workload: Workload, options: Options, batches: list[dict], losses: list) -> float:
    """The naive loop over ``batches``; returns the timed steps/s and appends each step's loss to ``losses``."""
    from transformers import AutoModelForCausalLM

    alpha, temperature = distill_defaults()
    trainers.seed(options)
    teacher = AutoModelForCausalLM.from_pretrained(workload.model("teacher"), dtype=torch.float32)
    teacher = teacher.to(options.device).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(workload.model("student"), dtype=torch.float32)
    student = student.to(options.device).train()
    optimizer = trainers.adamw(options)(student.parameters())
    clock = timing.StepClock(options.warmup, options.device)
    for step, batch in enumerate(batches, start=1):
        input_ids = batch["input_ids"].to(options.device)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        student_logits = student(input_ids=input_ids, use_cache=False).logits
        loss = naive_loss(student_logits[:, :-1], teacher_logits[:, :-1], input_ids[:, 1:], alpha, temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        clock.tick(step)
    return clock.steps_per_s


def fixed_batches(batches: list[dict]):
    """A LightningDataModule serving ``batches`` as they are, in order."""
    import lightning as L
    from torch.utils.data import DataLoader

    class FixedBatches(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(batches, batch_size=None, shuffle=False)

    return FixedBatches()


def build_module(workload: Workload, options: Options):
    from lit_distill.models.loading import ModelSpec
    from lit_distill.modules import DistillModule

    trainers.seed(options)
    return DistillModule(student=ModelSpec(name_or_path=workload.model("student"), tokenizer=workload.tokenizer),
                         teacher=ModelSpec(name_or_path=workload.model("teacher"), tokenizer=workload.tokenizer),
                         divergence="forward_kl", optimizer=trainers.adamw(options))


def lightning_fit(workload: Workload, options: Options, batches: list[dict], losses: list) -> float:
    """DistillModule on ``batches``; returns the timed steps/s and appends each step's mean loss to ``losses``."""
    import lightning as L

    class LossRecorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tokens = (batch["labels"][:, 1:] != -100).sum()
            losses.append(outputs["loss"].detach() / tokens)  # the token-summed loss of a 1-device, 1-batch step

    return trainers.lightning_fit(build_module(workload, options), fixed_batches(batches), options,
                                  callbacks=[LossRecorder()])


def measure(workload: Workload, options: Options, settings: Settings, rounds: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`")  # by design
    batches = token_batches(workload, settings, options.warmup + options.steps)
    with torch.device("meta"):
        counts = {name: matmul_parameters(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
            workload.model(name)))) for name in ("teacher", "student")}
    flops_per_token = 2 * counts["teacher"] + 6 * counts["student"]
    peak = matmul_peak(settings, options.device)
    losses = {"naive": [], "lit_distill": []}
    tokens_per_step = settings.batch_size * settings.seq_len
    candidates = {"naive": lambda: tokens_per_step * naive_fit(workload, options, batches, losses["naive"]),
                  "lit_distill": lambda: tokens_per_step * lightning_fit(workload, options, batches,
                                                                         losses["lit_distill"])}
    comparison = timing.interleave(candidates, rounds)
    rows = []
    for name in candidates:
        tokens_per_s = comparison.median(name)
        gflops = tokens_per_s * flops_per_token / 1e9
        rows.append({"loop": name, "tokens_per_s": tokens_per_s, "gflops": gflops, "mfu": gflops / peak["gflops"],
                     "first_loss": losses[name][0].item(), "rounds": comparison.rounds[name]})
    alpha, temperature = distill_defaults()
    return {"settings": dataclasses.asdict(settings), "teacher": workload.model("teacher"),
            "student": workload.model("student"), "matmul_parameters": counts, "flops_per_token": flops_per_token,
            "alpha": alpha, "temperature": temperature, "steps": options.steps, "warmup": options.warmup,
            "device": options.device, "threads": torch.get_num_threads(), "peak": peak, "rows": rows,
            "ratio": comparison.ratio("lit_distill", "naive"),
            "first_loss_diff": abs(rows[0]["first_loss"] - rows[1]["first_loss"]),
            "max_loss_diff": max(abs(a.item() - b.item()) for a, b in zip(losses["naive"][:len(batches)],
                                                                           losses["lit_distill"][:len(batches)]))}


def table(result: dict) -> str:
    settings, counts = result["settings"], result["matmul_parameters"]
    lines = [f"KD step, {result['teacher']} ({counts['teacher'] / 1e6:.1f} M matmul params) → {result['student']} "
             f"({counts['student'] / 1e6:.1f} M), B={settings['batch_size']} T={settings['seq_len']} fp32, AdamW, "
             f"alpha {result['alpha']} T {result['temperature']}, {result['flops_per_token'] / 1e6:.0f} MFLOP/token "
             f"(2·N_teacher + 6·N_student); fp32 matmul peak {result['peak']['gflops']:.0f} GFLOP/s "
             f"({result['device']}, {result['threads']} threads); median of {len(result['rows'][0]['rounds'])} "
             f"interleaved rounds of {result['steps']} steps",
             "| loop | tokens/s | GFLOP/s | MFU | first-step loss |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['loop']} | {row['tokens_per_s']:.0f} | {row['gflops']:.1f} | {row['mfu']:.1%} | "
                     f"{row['first_loss']:.6f} |")
    lines.append(f"DistillModule / naive: {result['ratio']:.2f}×; loss difference |naive − lit_distill|: "
                 f"{result['first_loss_diff']:.1e} at the first step, at most {result['max_loss_diff']:.1e} over the "
                 "first round's steps")
    return "\n".join(lines)
