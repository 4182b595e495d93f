"""Does the teacher help? CE-only vs KD from the live teacher vs KD from the logit cache, at equal steps and data.

    python bin/distill_comparison.py --config configs/distill/smollm2_real.yaml --out runs/smollm2_comparison
    python bin/distill_comparison.py --config configs/distill/smollm2_real.yaml --students cut --steps 20  # short

Each arm is one ``python -m lit_distill fit`` of the config in its own process, with the same seed, data order,
optimizer and schedule; only the teacher signal differs:

* ``ce``: alpha 1 (the divergence has weight 0: plain cross-entropy), no teacher loaded (teacher perplexity is
  read from the cache);
* ``kd_cache``: the config's alpha, teacher top-k log-probabilities from the logit cache;
* ``kd_live``: the config's alpha, the live teacher's full distribution (no cache).

Students: ``cut`` is the config's student; ``scratch`` a smaller model of the same tokenizer initialised randomly
(``--scratch-config``, its own learning rate). The cache is built once, first, by ``cache-teacher`` (timed).

Writes under ``--out``: ``results.json`` (every arm's held-out perplexities before/after, wall time, the cache's
size and build time), ``results.md`` (the table, with the fraction of the CE student's perplexity gap to the
teacher that KD closes: (ppl_CE − ppl_KD) / (ppl_CE − ppl_teacher)), and ``curves.png`` (training loss and
validation perplexity of every arm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from lit_distill.commands.plot import read_metric_series

ROOT = Path(__file__).resolve().parent.parent

SCRATCH_CONFIG = ('{num_hidden_layers: 4, hidden_size: 256, intermediate_size: 768, num_attention_heads: 4, '
                  'num_key_value_heads: 2}')
ARMS = ("ce", "kd_cache", "kd_live")


def start(command: list[str], log: Path, threads: Optional[int] = None) -> tuple[subprocess.Popen, float]:
    """Start a command (stdout and stderr to ``log``; ``threads`` pins its intra-op threads): the process, its start."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return process, time.perf_counter()


def finish(process: subprocess.Popen, started: float, log: Path) -> tuple[float, float]:
    """Wait for a started command: its wall time in seconds and peak resident memory in MiB."""
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(process.args)} failed; see {log}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def run(command: list[str], log: Path) -> tuple[float, float]:
    return finish(*start(command, log), log)


def run_arms(commands: dict[str, tuple[list[str], Path]], threads: Optional[int]) -> dict[str, tuple[float, float]]:
    """Run every arm's ``(command, log)``: one after the other, or with ``threads`` all at once. Wall time and peak
    memory per arm."""
    if threads is None:
        return {arm: run(command, log) for arm, (command, log) in commands.items()}
    started = {arm: start(command, log, threads) for arm, (command, log) in commands.items()}
    return {arm: finish(*started[arm], commands[arm][1]) for arm in commands}


def median_tokens_per_s(metrics_csv: Path) -> float:
    """Median of the run's logged perf/tokens_per_s (the first logged steps, warm-up, excluded)."""
    import numpy as np

    series = read_metric_series(metrics_csv, ["perf/tokens_per_s"])
    if not series:  # the run was shorter than trainer.log_every_n_steps
        return float("nan")
    values = series["perf/tokens_per_s"][1]
    return float(np.median(values[2:] if len(values) > 4 else values))


def arm_overrides(arm: str, student: str, args: argparse.Namespace, out: Path) -> list[str]:
    # After the user's overrides (which apply to every arm), so that what defines an arm always wins: the CE arm
    # stays CE whatever alpha the overrides give the KD arms.
    overrides = [*args.overrides, "--trainer.max_steps", str(args.steps),
                 "--trainer.val_check_interval", str(args.val_every),
                 "--trainer.logger.init_args.save_dir", str(out / "logs"),
                 "--trainer.logger.init_args.name", f"{student}_{arm}",
                 "--model.init_args.save_dir", str(out / "students" / f"{student}_{arm}"),
                 "--model.init_args.logit_cache.path", str(out / "teacher_cache")]
    if arm == "ce":
        overrides += ["--model.init_args.alpha", "1.0"]
    if arm == "kd_live":
        overrides += ["--model.init_args.logit_cache", "null"]
    if student == "scratch":  # the config student's architecture source, resized, random weights
        source = student_source(args.config)
        overrides += ["--model.init_args.student", f"{{name_or_path: {source}, from_scratch: true, keep_layers: null, "
                      f"config: {args.scratch_config}}}", "--model.init_args.optimizer.init_args.lr",
                      str(args.scratch_lr)]
    return overrides


def student_source(configs: list[str]):
    """The student's ``name_or_path`` in the last of the composed ``configs`` that sets it."""
    sources = [((yaml.safe_load(Path(config).read_text()) or {}).get("model", {}).get("init_args", {})
                .get("student", {}) or {}).get("name_or_path") for config in configs]
    return next((source for source in reversed(sources) if source), None)


def best_held_out(metrics_csv: Path) -> dict:
    """The lowest validation perplexity of a run and its step (what early stopping on val/ppl would keep)."""
    series = read_metric_series(metrics_csv, ["val/ppl"])
    if not series:
        return {"best_ppl": float("nan"), "best_step": None}
    steps, ppl = series["val/ppl"]
    return {"best_ppl": float(ppl.min()), "best_step": int(steps[ppl.argmin()])}


def newest_report(log_dir: Path) -> dict:
    return json.loads(max(log_dir.rglob("distill_report.json"), key=os.path.getmtime).read_text())


def gap_closed(ce: float, kd: float, teacher: float) -> float:
    """The fraction of the CE student's perplexity gap to the teacher that KD closes."""
    return (ce - kd) / (ce - teacher)


def table(results: dict) -> str:
    lines = ["| student | arm | held-out ppl (start → end) | best (step) | teacher ppl | gap closed (end / best) | "
             "wall time | train tokens/s | peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for student, arms in results["students"].items():
        ce, ce_best = arms["ce"]["student_ppl_after"], arms["ce"]["best_ppl"]
        for arm, values in arms.items():
            ppl, best, teacher = values["student_ppl_after"], values["best_ppl"], values["teacher_ppl_after"]
            closed = "—" if arm == "ce" else (f"{100 * gap_closed(ce, ppl, teacher):.0f} % / "
                                              f"{100 * gap_closed(ce_best, best, teacher):.0f} %")
            lines.append(f"| {student} | {arm} | {values['student_ppl_before']:.0f} → {ppl:.2f} | "
                         f"{best:.2f} ({values['best_step']}) | {teacher:.2f} | "
                         f"{closed} | {values['wall_s']:.0f} s | {values['tokens_per_s']:.0f} | "
                         f"{values['peak_rss_mib']:.0f} MiB |")
    cache = results["cache"]
    lines.append(f"\nCache: {cache['mib']:.1f} MiB, {cache['bytes_per_token']:.0f} bytes per cached token, built in "
                 f"{cache['build_s']:.0f} s.")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, ppl_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for student, arms in results["students"].items():
        for arm, values in arms.items():
            series = read_metric_series(values["metrics_csv"])
            label = f"{student} {arm}"
            if "train/ce" in series:
                loss_axis.plot(*series["train/ce"], label=label)
            if "val/ppl" in series:  # from the report's start value at step 0
                steps, ppl = series["val/ppl"]
                ppl_axis.plot([0, *steps], [values["student_ppl_before"], *ppl], marker="o", label=label)
    teacher = next(iter(results["students"].values()))["ce"]["teacher_ppl_after"]
    ppl_axis.axhline(teacher, color="black", linestyle="--", label="teacher")
    loss_axis.set(title="training cross-entropy (labels)", xlabel="step")
    ppl_axis.set(title="held-out perplexity", xlabel="step", yscale="log")
    for axis in (loss_axis, ppl_axis):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = out / "curves.png"
    figure.savefig(path, dpi=110)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append",
                        help="a DistillModule config with a logit_cache; repeated, they compose left to right")
    parser.add_argument("--out", default="runs/distill_comparison", type=Path)
    parser.add_argument("--students", nargs="+", choices=("cut", "scratch"), default=["cut", "scratch"])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--scratch-config", default=SCRATCH_CONFIG, help="transformers config overrides")
    parser.add_argument("--scratch-lr", type=float, default=1e-3)
    parser.add_argument("--parallel", action="store_true",
                        help="run a student's arms at the same time, the cores split evenly between them "
                             "(equal contention; wall times are then not comparable with sequential runs)")
    parser.add_argument("overrides", nargs="*", help="extra CLI overrides for every arm (after --)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if (out / "results.json").exists():
        sys.exit(f"{out / 'results.json'} exists: choose another --out (runs are never overwritten)")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "lit_distill"]
    configs = [argument for config in args.config for argument in ("--config", config)]
    build_s, _ = run(cli + ["cache-teacher", *configs, "--output", str(out / "teacher_cache")]
                  + args.overrides, out / "cache_teacher.log")
    from lit_distill.teachers.logit_cache import cache_size

    size, tokens = cache_size(out / "teacher_cache")
    results = {"config": args.config, "steps": args.steps, "students": {},
               "cache": {"build_s": build_s, "mib": size / 2 ** 20, "tokens": tokens, "bytes_per_token": size / tokens}}
    threads = max(1, (os.cpu_count() or 1) // len(args.arms)) if args.parallel else None
    for student in args.students:
        results["students"][student] = {}
        commands = {arm: (cli + ["fit", *configs] + arm_overrides(arm, student, args, out),
                          out / f"{student}_{arm}.log") for arm in args.arms}
        for arm, (wall, peak) in run_arms(commands, threads).items():
            name = f"{student}_{arm}"
            report = newest_report(out / "logs" / name)
            csv = max((out / "logs" / name).rglob("metrics.csv"), key=os.path.getmtime)
            results["students"][student][arm] = {**report, **best_held_out(csv), "wall_s": wall,
                                                 "peak_rss_mib": peak, "tokens_per_s": median_tokens_per_s(csv),
                                                 "metrics_csv": str(csv), "threads": threads}
            print(f"{name}: held-out ppl {report['student_ppl_before']:.1f} -> {report['student_ppl_after']:.2f} "
                  f"(teacher {report['teacher_ppl_after']:.2f}) in {wall:.0f} s", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results) + "\n")
    print(table(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {plot(results, out)}")


if __name__ == "__main__":
    main()
