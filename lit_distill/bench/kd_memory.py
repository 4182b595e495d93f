"""Peak memory of the KD loss: forward + backward of ``kd_loss`` chunked and unchunked, each in a fresh process.

``python -m lit_distill bench kd_memory``: forward + backward of ``kd_loss(..., reduction="mean")`` (forward KL,
alpha 0.5) on random (B, T, V) fp32 student and teacher logits, the student's with ``requires_grad``, once per
chunk size (``--kd-memory-chunk-sizes``, ``none`` = unchunked), each in a fresh subprocess, so that one variant's
freed or cached memory cannot hide another's peak.

* peak extra MiB: peak memory during the forward + backward minus what the process held once the inputs (both
  logits and the labels) were allocated and written. It includes the gradient of the student logits, one
  logits-sized tensor (the table's header gives that size), which any implementation must produce.
  CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` after the inputs (bytes held by tensors; the
  caching allocator's reserve is not counted).
  CPU (Linux): the process's peak resident set (``VmHWM``, reset to the current size by writing 5 to
  ``/proc/self/clear_refs`` right after the inputs were written) minus its resident set then (``VmRSS``); where the
  reset is refused, ``ru_maxrss`` after minus before, which is right only when the inputs, allocated last, made the
  process larger than it ever was (true of the default sizes, not of small ones: importing torch peaks higher). A
  tiny ``kd_loss`` call runs before the inputs are allocated, so one-off costs (thread pools, kernel set-up) are
  part of the baseline. The workers run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, so every tensor
  block of 1 MiB or more is mapped on allocation and unmapped when freed, and the RSS follows what tensors hold.
  Left dynamic, glibc raises the threshold up to 32 MiB and keeps freed blocks below it in its heap: chunks of 64
  rows (12 MiB intermediates) then measured 0.75-1 logit more than with the fixed threshold, an allocator artefact
  that varies from run to run. CPU times therefore include zero-filling fresh pages for every block.
* time s: the fastest of ``--kd-memory-repeats`` forward + backward passes.
* |dloss|, max|dgrad|: a chunked variant's loss and student-logit gradient against an unchunked pass on the same
  inputs, run in the same process after the peak was read; they differ only by summation order.

This module is also the worker: ``python -m lit_distill.bench.kd_memory SETTINGS_JSON CHUNK`` measures one chunk
size and prints its row as JSON; it imports torch and ``lit_distill.losses`` only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

NEEDS_WORKLOAD = False  # random logits: no models, no workload directory
MIB = 2 ** 20
DTYPES = ("float32", "bfloat16", "float16")


def parse_chunk_sizes(text: str) -> tuple[Optional[int], ...]:
    """``none,256,1024`` -> ``(None, 256, 1024)``."""
    return tuple(None if item.strip().lower() == "none" else int(item) for item in text.split(","))


@dataclass(frozen=True)
class Settings:
    chunk_sizes: tuple[Optional[int], ...] = field(
        default=(None, 256, 1024), metadata={"parse": parse_chunk_sizes,
                                             "help": "comma-separated tokens per chunk; none = unchunked"})
    vocab_size: int = field(default=50257, metadata={"help": "V (GPT-2's vocabulary)"})
    seq_len: int = field(default=512, metadata={"help": "T"})
    batch_size: int = field(default=4, metadata={"help": "B"})
    dtype: str = field(default="float32", metadata={
        "choices": DTYPES, "help": "dtype of both logits: float32, bfloat16 or float16 (upcast to fp32 in the loss)"})
    repeats: int = field(default=1, metadata={"help": "timed forward+backward passes per chunk size (fastest kept)"})


def kd_pass(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
            chunk_size: Optional[int]) -> torch.Tensor:
    """One forward + backward of the loss; leaves the gradient in ``student.grad``, returns the detached loss."""
    from lit_distill.losses import kd_loss

    student.grad = None  # a fresh gradient each pass, not an accumulation into the previous one
    loss, _ = kd_loss(student, teacher, labels, chunk_size=chunk_size, reduction="mean")
    loss.backward()
    return loss.detach()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_bytes(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))  # kB


_PEAK_RESET = False  # whether _reset_peak_rss managed to reset VmHWM


def _reset_peak_rss() -> int:
    """Reset the peak resident set to the current one where Linux allows it; return the baseline in bytes."""
    global _PEAK_RESET
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        _PEAK_RESET = True
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _peak_rss() -> int:
    return _status_bytes("VmHWM") if _PEAK_RESET else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(settings: Settings, chunk_size: Optional[int], device: str) -> dict:
    """Measure one chunk size in this process, which must do nothing else (see the module docstring)."""
    device, dtype = torch.device(device), getattr(torch, settings.dtype)
    generator = torch.Generator(device).manual_seed(0)

    def make_inputs(batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (batch, seq_len, settings.vocab_size)  # (B, T, V)
        student = torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_()
        teacher = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        labels = torch.randint(settings.vocab_size, shape[:2], generator=generator, device=device)  # (B, T)
        return student, teacher, labels

    kd_pass(*make_inputs(1, 8), chunk_size)  # one-off set-up costs go into the baseline
    student, teacher, labels = make_inputs(settings.batch_size, settings.seq_len)  # randn writes every page
    _synchronize(device)
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = _reset_peak_rss()
    times = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        loss = kd_pass(student, teacher, labels, chunk_size)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
    method = ("CUDA max_memory_allocated" if device.type == "cuda"
              else "peak RSS (VmHWM, reset)" if _PEAK_RESET else "peak RSS (ru_maxrss)")
    row = {"chunk_size": chunk_size, "memory": method, "peak_extra_mib": (peak - baseline) / MIB, "time_s": min(times),
           "loss": loss.item(), "loss_diff": None, "grad_diff": None}
    if chunk_size is not None:
        grad = student.grad
        reference = kd_pass(student, teacher, labels, None)
        row["loss_diff"] = (loss - reference).abs().item()
        row["grad_diff"] = (grad - student.grad).abs().max().item()
    return row


def measure(workload, options, settings: Settings, rounds: int) -> dict:
    """One fresh subprocess per chunk size (``workload`` and ``rounds`` are unused: see ``Settings.repeats``)."""
    if settings.dtype not in DTYPES:
        raise ValueError(f"kd_memory dtype must be one of {DTYPES}, got {settings.dtype!r}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB),  # see the module docstring (glibc only)
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the parent's thread count
    rows = []
    for chunk_size in settings.chunk_sizes:
        command = [sys.executable, "-m", "lit_distill.bench.kd_memory", json.dumps(dataclasses.asdict(settings)),
                   json.dumps(chunk_size), options.device]
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env)  # stderr shown
        rows.append(json.loads(result.stdout.splitlines()[-1]))
    logits_mib = settings.batch_size * settings.seq_len * settings.vocab_size * getattr(torch, settings.dtype).itemsize
    return {"settings": dataclasses.asdict(settings), "device": options.device, "logits_mib": logits_mib / MIB,
            "rows": rows}


def table(result: dict) -> str:
    settings = result["settings"]
    method = " / ".join(sorted({row["memory"] for row in result["rows"]}))
    lines = [f"KD loss forward+backward, B={settings['batch_size']} T={settings['seq_len']} V={settings['vocab_size']} "
             f"{settings['dtype']} logits ({result['logits_mib']:.0f} MiB each), {method} above the inputs, fastest of "
             f"{settings['repeats']}",
             "| chunk size | peak extra MiB | × logits | time s | abs dloss | max abs dgrad |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        diffs = ("—", "—") if row["loss_diff"] is None else (f"{row['loss_diff']:.1e}", f"{row['grad_diff']:.1e}")
        lines.append(f"| {row['chunk_size'] or 'none'} | {row['peak_extra_mib']:.0f} | "
                     f"{row['peak_extra_mib'] / result['logits_mib']:.2f} | {row['time_s']:.2f} | {diffs[0]} | "
                     f"{diffs[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the worker: SETTINGS_JSON CHUNK_JSON DEVICE
    fields = json.loads(sys.argv[1])
    fields["chunk_sizes"] = tuple(fields["chunk_sizes"])
    print(json.dumps(worker(Settings(**fields), json.loads(sys.argv[2]), sys.argv[3])))
