"""Run the training-loop benchmarks: lit_distill alone, or side by side with TRL (``--compare``).

    python -m lit_distill.bench                              # every workload, lit_distill only
    pip install -e '.[bench]' && python -m lit_distill.bench --compare --rounds 3 --json runs/bench/tiny.json
    python -m lit_distill.bench dpo reward --compare --model smollm2 --batch-size 4 --max-length 128

Each workload is trained ``--warmup`` + ``--steps`` optimizer steps in a fresh trainer per round; with ``--compare``
lit_distill and TRL alternate (A B A B …) for ``--rounds`` rounds in this one process, on the same files (models,
tokenizer and rows of ``lit_distill.bench.workload``), and the table gives the median steps/s of each and the median
of the per-round ratios. Pin the threads (``OMP_NUM_THREADS``, or ``--threads``) and keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import platform
import sys
from pathlib import Path
from typing import Optional

import torch

from lit_distill.bench import timing
from lit_distill.bench.workload import MODELS, Measurement, Options, build

MODULES = ("reward", "dpo", "kd", "grpo")  # lit_distill.bench.<module>.MEASUREMENTS, in table order


def measurements() -> dict[str, Measurement]:
    found = {}
    for module in MODULES:
        for measurement in importlib.import_module(f"lit_distill.bench.{module}").MEASUREMENTS:
            found[measurement.name] = measurement
    return found


def parse_args(argv: Optional[list[str]], names: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lit_distill.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"any of {', '.join(names)} (default: all)")
    parser.add_argument("--compare", action="store_true", help="also run TRL's trainer, interleaved")
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--workdir", type=Path, help="where the workload files are built (default runs/bench/MODEL)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: as OMP_NUM_THREADS)")
    parser.add_argument("--json", type=Path, help="write the results here (refused if the file exists)")
    for option in dataclasses.fields(Options):
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=type(option.default), default=option.default)
    args = parser.parse_args(argv)
    unknown = [name for name in args.workloads if name not in names]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.json and args.json.exists():
        parser.error(f"--json {args.json} exists: choose another file (results are never overwritten)")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    available = measurements()
    args = parse_args(argv, list(available))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("--compare needs TRL: pip install -e '.[bench]'")
    timing.quiet()
    options = Options(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Options)})
    workload = build(args.workdir or Path("runs/bench") / args.model, model=args.model, seed=options.seed)
    rows = []
    for name in args.workloads or list(available):
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
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"options": dataclasses.asdict(options), "model": args.model,
                                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                                         "machine": platform.processor() or platform.machine(), "rows": rows},
                                        indent=2))


def table(rows: list[dict]) -> str:
    lines = ["| workload | lit_distill steps/s | TRL steps/s | lit_distill / TRL |", "|---|---|---|---|"]
    for row in rows:
        trl_speed = f"{row['trl_steps_per_s']:.3f}" if "trl_steps_per_s" in row else "—"
        ratio = f"{row['ratio']:.2f}×" if "ratio" in row else "—"
        lines.append(f"| {row['workload']} | {row['lit_distill_steps_per_s']:.3f} | {trl_speed} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
