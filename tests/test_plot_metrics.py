"""python -m lit_distill plot: the series it plots are the values a CSVLogger wrote (sparse columns, NaN, several versions),
the PNGs are valid images of the expected size, the command line and its errors."""

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader

COMMAND = [sys.executable, "-m", "lit_distill", "plot"]


@pytest.fixture(scope="module")
def script():
    return importlib.import_module("lit_distill.commands.plot")


def log_run(save_dir, version=None):
    """A CSVLogger run: step-level train/ and kd/ metrics (one NaN), validation every 10 steps, an ungrouped
    learning rate. Returns the metrics.csv path and the finite ``{name: (steps, values)}`` logged."""
    logger = CSVLogger(save_dir, name="run", version=version)
    expected = {name: ([], []) for name in ("train/loss", "kd/kl", "lr", "val/loss", "val/ppl")}

    def log(metrics, step):
        logger.log_metrics(metrics, step=step)
        for name, value in metrics.items():
            if name in expected and math.isfinite(value):
                expected[name][0].append(step)
                expected[name][1].append(value)

    for step in range(40):
        log({"train/loss": 5.0 * 0.95 ** step, "kd/kl": float("nan") if step == 3 else 1.0 / (step + 1),
             "lr": 1e-3 * (1 - step / 40), "epoch": step // 20}, step)
        if step % 10 == 9:
            loss = 4.0 - step / 20
            log({"val/loss": loss, "val/ppl": math.exp(loss), "epoch": step // 20}, step)
    logger.save()
    return Path(logger.log_dir) / "metrics.csv", {name: tuple(map(np.array, points)) for name, points in expected.items()}


def assert_series_equal(actual, expected):
    assert list(actual) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(actual[name][0], expected[name][0], err_msg=name)
        np.testing.assert_array_equal(actual[name][1], expected[name][1], err_msg=name)


def test_series_are_the_logged_values(script, tmp_path):
    csv_path, expected = log_run(tmp_path)
    series = script.read_metric_series(csv_path)
    assert_series_equal(series, {name: expected[name] for name in sorted(expected)})  # CSVLogger sorts its columns
    assert 3 not in series["kd/kl"][0] and len(series["kd/kl"][0]) == 39  # the NaN row is left out
    assert list(series["val/loss"][0]) == [9, 19, 29, 39]
    chosen = script.read_metric_series(csv_path, ["val/*", "lr"])
    assert_series_equal(chosen, {name: expected[name] for name in ("lr", "val/loss", "val/ppl")})


def test_figures_plot_the_series(script, tmp_path):
    csv_path, _ = log_run(tmp_path)
    series = script.read_metric_series(csv_path, ["val/*"])
    figure = script.group_figure("val", series, "run/version_0")
    axes = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title() for axis in axes] == ["val/loss", "val/ppl"]
    for axis, (steps, values) in zip(axes, series.values()):
        (line,) = axis.get_lines()
        np.testing.assert_array_equal(line.get_xydata(), np.stack([steps, values], axis=1))
        assert axis.get_xlabel() == "step"
    summary = script.summary_figure({"val/loss": series["val/loss"]}, "run/version_0")
    assert [text.get_text() for text in summary.axes[0].get_legend().get_texts()] == ["val/loss"]


def png_size(path):
    with Image.open(path) as image:
        image.verify()  # raises on a truncated or corrupt file
        assert image.format == "PNG"
        return image.size


def expected_size(script, num_metrics):
    columns = min(script.SUBPLOT_COLUMNS, num_metrics)
    rows = math.ceil(num_metrics / columns)
    return (round(script.SUBPLOT_SIZE[0] * columns * script.DPI), round(script.SUBPLOT_SIZE[1] * rows * script.DPI))


def test_command_line_on_the_newest_version(script, tmp_path):
    old_csv, _ = log_run(tmp_path, version=0)
    new_csv, _ = log_run(tmp_path, version=1)
    os.utime(old_csv, (0, 0))  # version_0 is older whatever the file system's time resolution
    result = subprocess.run([*COMMAND, str(tmp_path / "run")], capture_output=True, text=True,
                            check=True)
    directory = new_csv.parent
    written = [Path(line) for line in result.stdout.splitlines()]
    assert written == [directory / name for name in ("kd.png", "other.png", "train.png", "val.png", "summary.png")]
    sizes = {path.name: png_size(path) for path in written}
    assert sizes["val.png"] == expected_size(script, 2)
    assert sizes["train.png"] == sizes["kd.png"] == expected_size(script, 1)
    summary_inches = script.SUMMARY_SIZE
    assert sizes["summary.png"] == (round(summary_inches[0] * script.DPI), round(summary_inches[1] * script.DPI))
    assert not list(old_csv.parent.glob("*.png"))

    output_dir = tmp_path / "plots"
    script.main([str(old_csv.parent), "--output-dir", str(output_dir), "--metrics", "val/loss"])
    assert sorted(path.name for path in output_dir.iterdir()) == ["summary.png", "val.png"]


class LoggingModel(L.LightningModule):
    """A linear model that logs its loss on step and epoch, and a validation loss, like our modules do."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.train_losses = []

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.train_losses.append(loss.item())
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_trainers_sparse_csv(script, tmp_path):
    torch.manual_seed(0)
    data = DataLoader(torch.randn(16, 4), batch_size=4)
    model = LoggingModel()
    trainer = L.Trainer(max_epochs=3, log_every_n_steps=1, logger=CSVLogger(tmp_path, name="fit"), accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data, data)
    csv_path = script.find_metrics_csv(tmp_path)
    series = script.read_metric_series(csv_path)
    assert set(series) == {"train/loss_step", "train/loss_epoch", "val/loss"}
    steps, values = series["train/loss_step"]
    np.testing.assert_allclose(values, model.train_losses, rtol=1e-6)
    assert (np.diff(steps) > 0).all()
    assert len(series["val/loss"][0]) == len(series["train/loss_epoch"][0]) == 3
    written = script.plot_metrics(csv_path)
    assert [path.name for path in written] == ["train.png", "val.png", "summary.png"]
    assert png_size(written[0]) == expected_size(script, 2)


def test_errors(script, tmp_path):
    with pytest.raises(script.PlotError, match="does not exist"):
        script.find_metrics_csv(tmp_path / "missing")
    with pytest.raises(script.PlotError, match="no metrics.csv under"):
        script.find_metrics_csv(tmp_path)
    counters_only = tmp_path / "metrics.csv"
    counters_only.write_text("epoch,step\n0,0\n0,1\n")
    with pytest.raises(script.PlotError, match="no numeric metrics to plot"):
        script.plot_metrics(counters_only)
    counters_only.write_text("epoch,step,note,train/loss\n0,0,warm-up,1.5\n")
    with pytest.raises(script.PlotError, match=r"no numeric metrics matching \['val/\*'\]"):
        script.plot_metrics(counters_only, patterns=["val/*"])
    assert list(script.read_metric_series(counters_only)) == ["train/loss"]  # the text column is skipped
    not_metrics = tmp_path / "other.csv"
    not_metrics.write_text("a,b\n1,2\n")
    with pytest.raises(script.PlotError, match="'step' column"):
        script.plot_metrics(not_metrics)
    result = subprocess.run([*COMMAND, str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "does not exist" in result.stderr
