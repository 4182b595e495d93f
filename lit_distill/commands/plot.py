"""Plot a run's CSV metrics as PNG files, for runs tracked without a wandb or TensorBoard server.

    python -m lit_distill plot runs/quickstart                       # the newest version_*/metrics.csv inside
    python -m lit_distill plot runs/quickstart/version_3 --output-dir plots/
    python -m lit_distill plot runs/dpo/version_0/metrics.csv --metrics 'train/*' 'dpo/reward_*'

Input: the ``metrics.csv`` a Lightning ``CSVLogger`` writes, or a directory holding one (the logger's save dir, a
run name, a version directory). A directory with several finds the most recently written one.

Lightning's CSV has one column per metric and one row per logging call, so columns are sparse: step-level rows
and epoch-level rows (validation, ``*_epoch``) leave the other metrics empty. Each metric is plotted over the
``step`` column at the rows where it has a value; non-numeric columns are skipped.

Output (next to the CSV unless ``--output-dir``): one ``<group>.png`` per metric group, the name's prefix before
the first ``/`` (``train/loss`` -> ``train.png``, ``kd/kl`` -> ``kd.png``; names without ``/`` go to ``other.png``),
with one subplot per metric; and ``summary.png``, the loss curves of :data:`SUMMARY_METRICS` that the run has on
one axes. ``--metrics`` keeps the metrics matching any of its glob patterns. The written paths are printed.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Columns Lightning's CSVLogger writes that are the x axis or a counter, not metrics.
INDEX_COLUMNS = ("step", "epoch")
# The loss curves of summary.png, those the run has: step-level training loss (``train/loss_step`` when the module
# logs it on step and epoch) and validation loss.
SUMMARY_METRICS = ("train/loss", "train/loss_step", "val/loss")
SUBPLOT_COLUMNS = 3
SUBPLOT_SIZE = (4.8, 3.2)  # inches per subplot
SUMMARY_SIZE = (8.0, 4.5)  # inches
DPI = 100


class PlotError(ValueError):
    """A user-facing error (missing file, nothing to plot): printed without a traceback by the command line."""


def find_metrics_csv(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the most recently written ``metrics.csv`` under the directory."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise PlotError(f"'{path}' does not exist")
    candidates = list(path.rglob("metrics.csv"))
    if not candidates:
        raise PlotError(f"no metrics.csv under '{path}' (written by lightning.pytorch.loggers.CSVLogger)")
    return max(candidates, key=lambda candidate: (candidate.stat().st_mtime, str(candidate)))


def read_metric_series(csv_path: str | Path,
                       patterns: Optional[Sequence[str]] = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every numeric metric of a CSVLogger file as ``{name: (steps, values)}``, the rows where it has a value.

    Args:
        csv_path: the ``metrics.csv`` file.
        patterns: keep only metrics matching one of these glob patterns (``fnmatch``); None keeps all.

    Returns:
        Per metric, in column order, two float arrays of the same length: the ``step`` of each row that holds a
        finite value, and that value. Metrics with no finite value, or any non-numeric value, are left out.
    """
    with Path(csv_path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise PlotError(f"{csv_path}: expected a CSVLogger metrics file with a 'step' column; header is "
                            f"{reader.fieldnames}")
        rows = list(reader)
    names = [name for name in reader.fieldnames if name not in INDEX_COLUMNS and
             (patterns is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))]
    series = {}
    for name in names:
        points = _finite_points(rows, name)
        if points:
            steps, values = zip(*points)
            series[name] = (np.array(steps), np.array(values))
    return series


def _finite_points(rows: list[dict], name: str) -> Optional[list[tuple[float, float]]]:
    """``(step, value)`` of the rows where column ``name`` holds a finite number; None for a non-numeric column."""
    points = []
    for row in rows:
        if not row[name] or not row["step"]:
            continue  # a row of other metrics
        try:
            value = float(row[name])
        except ValueError:
            return None
        if math.isfinite(value):
            points.append((float(row["step"]), value))
    return points


def metric_group(name: str) -> str:
    """The prefix before the first ``/`` (``"other"`` when there is none)."""
    return name.split("/", 1)[0] if "/" in name else "other"


def group_figure(group: str, series: dict[str, tuple[np.ndarray, np.ndarray]], source: str) -> plt.Figure:
    """A figure with one subplot per metric of ``series`` (the metrics of ``group``), in a grid of at most
    :data:`SUBPLOT_COLUMNS` columns."""
    columns = min(SUBPLOT_COLUMNS, len(series))
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(SUBPLOT_SIZE[0] * columns, SUBPLOT_SIZE[1] * rows),
                                squeeze=False, layout="constrained")
    for axis, (name, (steps, values)) in zip(axes.flat, series.items()):
        _plot_line(axis, steps, values)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(series):]:
        axis.set_visible(False)
    figure.suptitle(f"{group} metrics  ({source})", fontsize=11)
    return figure


def summary_figure(series: dict[str, tuple[np.ndarray, np.ndarray]], source: str) -> plt.Figure:
    """The curves of ``series`` (loss metrics) on one axes, with a legend."""
    figure, axis = plt.subplots(figsize=SUMMARY_SIZE, layout="constrained")
    for name, (steps, values) in series.items():
        _plot_line(axis, steps, values, label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"loss  ({source})", fontsize=11)
    return figure


def _plot_line(axis, steps: np.ndarray, values: np.ndarray, label: Optional[str] = None) -> None:
    # Markers where points are few enough to see one by one (validation and epoch-level metrics).
    axis.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.2, label=label)


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def plot_metrics(csv_path: str | Path, output_dir: Optional[str | Path] = None,
                 patterns: Optional[Sequence[str]] = None) -> list[Path]:
    """Write the group PNGs and ``summary.png`` of a CSVLogger file (see the module docstring); returns their paths."""
    csv_path = Path(csv_path)
    series = read_metric_series(csv_path, patterns)
    if not series:
        chosen = f" matching {list(patterns)}" if patterns else ""
        raise PlotError(f"{csv_path}: no numeric metrics{chosen} to plot")
    output_dir = Path(output_dir) if output_dir is not None else csv_path.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    source = "/".join(csv_path.parts[-3:-1]) if csv_path.name == "metrics.csv" else csv_path.name  # run/version
    groups: dict[str, dict] = {}
    for name, points in series.items():
        groups.setdefault(metric_group(name), {})[name] = points
    written = [_save(group_figure(group, group_series, source), output_dir / f"{group.replace(' ', '_')}.png")
               for group, group_series in groups.items()]
    losses = {name: series[name] for name in SUMMARY_METRICS if name in series}
    if losses:
        written.append(_save(summary_figure(losses, source), output_dir / "summary.png"))
    return written


def main(argv: Optional[list[str]] = None) -> list[Path]:
    """Run the command line; returns the written paths. Raises :class:`PlotError` on bad input."""
    parser = argparse.ArgumentParser(prog="python -m lit_distill plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a CSVLogger metrics.csv, or a directory holding one (the newest is used)")
    parser.add_argument("--output-dir", help="where the PNGs go (default: next to the CSV)")
    parser.add_argument("--metrics", nargs="+", metavar="PATTERN",
                        help="plot only metrics matching these glob patterns, e.g. 'train/*' 'val/loss'")
    args = parser.parse_args(argv)
    written = plot_metrics(find_metrics_csv(args.path), args.output_dir, args.metrics)
    print("\n".join(str(path) for path in written))
    return written

