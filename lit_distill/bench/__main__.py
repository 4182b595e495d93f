"""lit_distill's benchmarks in one command: training loops (alone or side by side with TRL), sampling, KD-step MFU
and the KD loss's memory; each prints a table, ``--json`` writes every result to one new file.

Measurements (NAME arguments; default: every training loop, then ``sampling`` and ``mfu``):

  reward          RewardModule steps/s (vs TRL RewardTrainer with --compare)
  dpo             DPOModule steps/s (vs TRL DPOTrainer)
  kd_off_policy   DistillModule on the data's completions, steps/s (vs TRL GKDTrainer, lambda 0)
  kd_on_policy    DistillModule on the student's own samples, steps/s (vs TRL GKDTrainer, lambda 1)
  grpo            GRPOModule steps/s (vs TRL GRPOTrainer)
  sampling        lit_distill.rollout.generate vs HF model.generate, tokens/s, greedy and sampled
  mfu             DistillModule KD step vs a naive PyTorch loop: tokens/s, GFLOP/s, share of the fp32 matmul peak
  kd_memory       kd_loss forward+backward peak memory per chunk size, one subprocess each (slow: only when named)

    python -m lit_distill bench                                  # training loops + sampling + mfu, tiny models
    pip install -e '.[bench]' && python -m lit_distill bench --compare --rounds 3 --json runs/bench/tiny.json
    python -m lit_distill bench dpo reward --compare --model smollm2 --batch-size 4 --max-length 128
    python -m lit_distill bench kd_memory                        # B4 T512 V50257, chunks none,256,1024
    python -m lit_distill bench sampling --model smollm2 --rounds 5   # B8, 64 new tokens, greedy and sampled
    python -m lit_distill bench mfu --model smollm2 --rounds 3   # SmolLM2-135M -> 6-layer cut, B4 T128, fp32

Training loops: each workload is trained ``--warmup`` + ``--steps`` optimizer steps in a fresh trainer per round;
with ``--compare`` lit_distill and TRL alternate (A B A B …) for ``--rounds`` rounds in this one process, on the same
files (models, tokenizer and rows of ``lit_distill.bench.workload``), and the table gives the median steps/s of each
and the median of the per-round ratios. ``sampling`` (ours vs HF) and ``mfu`` (naive loop vs DistillModule)
alternate the same way for ``--rounds`` rounds; ``mfu`` also uses ``--warmup``, ``--steps``, ``--lr``, ``--device``
and ``--seed``; each measurement's own settings are its ``--sampling-*``, ``--mfu-*`` and ``--kd-memory-*`` options
below, and its module docstring (``lit_distill/bench/<name>.py``) says exactly what is timed. Pin the threads
(``OMP_NUM_THREADS``, or ``--threads``) and keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import torch

from lit_distill.bench import timing
from lit_distill.bench.workload import MODELS, Measurement, Options, build

TRAINING_MODULES = ("reward", "dpo", "kd", "grpo")  # lit_distill.bench.<module>.MEASUREMENTS, in table order
KERNELS = ("sampling", "mfu", "kd_memory")  # lit_distill.bench.<name>: Settings, measure, table, NEEDS_WORKLOAD
DEFAULT_KERNELS = ("sampling", "mfu")  # kd_memory runs only when named


def measurements() -> dict[str, Measurement]:
    found = {}
    for module in TRAINING_MODULES:
        for measurement in importlib.import_module(f"lit_distill.bench.{module}").MEASUREMENTS:
            found[measurement.name] = measurement
    return found


def kernel(name: str):
    return importlib.import_module(f"lit_distill.bench.{name}")


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join("none" if item is None else str(item) for item in value)
    return str(value)


def _argument_type(option: dataclasses.Field):
    parse = option.metadata.get("parse", type(option.default))

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    convert.__name__ = parse.__name__
    return convert


def parse_args(argv: Optional[list[str]], training: list[str]) -> argparse.Namespace:
    names = [*training, *KERNELS]
    parser = argparse.ArgumentParser(prog="python -m lit_distill bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"any of {', '.join(names)} (default: {', '.join([*training, *DEFAULT_KERNELS])})")
    parser.add_argument("--compare", action="store_true", help="also run TRL's trainer, interleaved (training loops)")
    parser.add_argument("--model", choices=MODELS, default="tiny", help="the workload's models (default: tiny)")
    parser.add_argument("--workdir", type=Path, help="where the workload files are built (default runs/bench/MODEL)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every comparison (default: 3)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: as OMP_NUM_THREADS)")
    parser.add_argument("--json", type=Path, help="write the results here (refused if the file exists)")
    group = parser.add_argument_group("training loops (warmup, steps, lr, device and seed also for mfu)")
    for option in dataclasses.fields(Options):
        flag = f"--{option.name.replace('_', '-')}"
        if isinstance(option.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=option.default,
                               help=f"default: {option.default}")
        else:
            group.add_argument(flag, type=type(option.default), default=option.default,
                               help=f"default: {option.default}")
    for name in KERNELS:
        group = parser.add_argument_group(name)
        for option in dataclasses.fields(kernel(name).Settings):
            group.add_argument(f"--{name}-{option.name}".replace("_", "-"), dest=f"{name}_{option.name}",
                               type=_argument_type(option), default=option.default, metavar=option.name.upper(),
                               choices=option.metadata.get("choices"),
                               help=f"{option.metadata.get('help', '')} (default: {_show(option.default)})")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in names]
    if unknown:
        parser.error(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.json and args.json.exists():
        parser.error(f"--json {args.json} exists: choose another file (results are never overwritten)")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    args.names = args.names or [*training, *DEFAULT_KERNELS]
    return args


def kernel_settings(args: argparse.Namespace, name: str):
    settings = kernel(name).Settings
    return settings(**{option.name: getattr(args, f"{name}_{option.name}") for option in dataclasses.fields(settings)})


def main(argv: Optional[list[str]] = None) -> None:
    available = measurements()
    args = parse_args(argv, list(available))
    if args.threads:
        torch.set_num_threads(args.threads)
    training = [name for name in args.names if name in available]
    kernels = [name for name in args.names if name in KERNELS]
    if args.compare and training:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("--compare needs TRL: pip install -e '.[bench]'")
    timing.quiet()
    options = Options(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Options)})
    device = (torch.cuda.get_device_name(options.device) if torch.device(options.device).type == "cuda" else
              f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} torch threads, load average {load:.1f} at "
          f"start, model {args.model}", flush=True)
    results = {"options": dataclasses.asdict(options), "model": args.model, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "machine": device, "load_average": load}
    workload = None
    if training or any(kernel(name).NEEDS_WORKLOAD for name in kernels):
        workload = build(args.workdir or Path("runs/bench") / args.model, model=args.model, seed=options.seed)

    if training:
        rows = results["training"] = []
        for name in training:
            measurement = available[name]
            candidates = {"lit_distill": lambda m=measurement: m.ours(workload, options)}
            if args.compare and measurement.trl is not None:
                candidates["trl"] = lambda m=measurement: m.trl(workload, options)
            comparison = timing.interleave(candidates, args.rounds)
            row = {"workload": name, "rounds": comparison.rounds,
                   **{f"{candidate}_steps_per_s": comparison.median(candidate) for candidate in candidates}}
            if "trl" in candidates:
                row["ratio"] = comparison.ratio("lit_distill", "trl")
            rows.append(row)
            print(f"{name:16s} " + "  ".join(f"{key} {value:.3f}" for key, value in row.items()
                                            if isinstance(value, float)), flush=True)
            write(args.json, results)
        print(table(rows) + "\n", flush=True)
    for name in kernels:
        module = kernel(name)
        settings = kernel_settings(args, name)
        results[name] = module.measure(workload, options, settings, args.rounds)
        print(module.table(results[name]) + "\n", flush=True)
        write(args.json, results)
    if args.json:
        print(f"wrote {args.json}")


def write(path: Optional[Path], results: dict) -> None:
    """Write ``results`` to ``path`` (after every measurement, so that a run stopped half-way keeps what it did;
    ``parse_args`` refused a file that existed before the run)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=2))
    temporary.replace(path)


def table(rows: list[dict]) -> str:
    lines = ["| workload | lit_distill steps/s | TRL steps/s | lit_distill / TRL |", "|---|---|---|---|"]
    for row in rows:
        trl_speed = f"{row['trl_steps_per_s']:.3f}" if "trl_steps_per_s" in row else "—"
        ratio = f"{row['ratio']:.2f}×" if "ratio" in row else "—"
        lines.append(f"| {row['workload']} | {row['lit_distill_steps_per_s']:.3f} | {trl_speed} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
