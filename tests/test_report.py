"""python -m cifarray.report regenerates every figure and table of a densenet and a dcgan run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifarray.config import to_dict
from cifarray.data.synth import write_synthetic
from cifarray.models.dcgan import Generator
from cifarray.models.densenet import DenseNet
from cifarray.rundir import MetricsLog, RunDir
from cifarray.train.config import DCGANTrainConfig, DenseNetTrainConfig
from cifarray.train.dcgan import FAMILY as GAN
from cifarray.train.densenet import FAMILY as DENSENET
from conftest import run_cli_here, run_module


def finished_run(root: Path, cfg, model: torch.nn.Module, weights: str, fields: list[str], row) -> Path:
    """A run folder as the trainers leave it (untrained weights: the figures do not depend on quality)."""
    run = RunDir(root)
    run.path.mkdir(parents=True)
    write_synthetic(run.data, train_per_class=cfg.synthetic_train_per_class,
                    test_per_class=cfg.synthetic_test_per_class)
    run.write_json("config.json", to_dict(cfg))
    run.write_json("summary.json", {"model": "dcgan" if weights == "generator.pt" else "densenet",
                                    "status": "complete"})
    torch.save(model.state_dict(), run.path / weights)
    log = MetricsLog(run.metrics, fields)
    for step in (10, 20, 30):
        log.append(row(step))
    return run.path


@pytest.fixture
def densenet_run(tmp_path) -> Path:
    cfg = DenseNetTrainConfig(synthetic=True, synthetic_train_per_class=12, synthetic_test_per_class=3, val_size=200,
                              growth_rate=4, blocks=(2, 2), init_channels=8, out=str(tmp_path / "dn"))
    return finished_run(tmp_path / "dn", cfg, DenseNet(cfg.model_config()), "model.pt", DENSENET.pieces.metrics_columns,
                        lambda s: {"step": s, "loss": 4 - s / 10, "train_acc": s / 100, "val_acc": s / 120})


@pytest.fixture
def dcgan_run(tmp_path) -> Path:
    cfg = DCGANTrainConfig(synthetic=True, synthetic_train_per_class=2, synthetic_test_per_class=1, val_size=50,
                           out=str(tmp_path / "gan"))
    return finished_run(tmp_path / "gan", cfg, Generator(cfg.model_config()), "generator.pt", GAN.pieces.metrics_columns,
                        lambda s: {"step": s, "loss_d": 1.0, "loss_g": 2.0, "d_real": 0.7, "d_fake": 0.3})


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # a valid PNG, not just a file
    with Image.open(path) as im:
        return im.size


def test_densenet_report(densenet_run):
    result = run_module("cifarray.report", str(densenet_run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert png_size(densenet_run / "curves.png") == (1000, 400)
    assert png_size(densenet_run / "inference.png") == (1000, 1100)
    with open(densenet_run / "per_class_accuracy.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 100 and sum(int(r["test_images"]) for r in rows) == 300
    with open(densenet_run / "confused_pairs.csv") as fh:
        pairs = list(csv.DictReader(fh))
    assert len(pairs) == 10
    totals = [int(p["total"]) for p in pairs]
    assert totals == sorted(totals, reverse=True) and all(p["class_a"] != p["class_b"] for p in pairs)
    assert all(int(p["a_as_b"]) + int(p["b_as_a"]) == int(p["total"]) for p in pairs)


def test_densenet_report_uses_the_predictions_the_worker_saved(densenet_run):
    """The trainer saves its test predictions with the weights; the report reads them instead of evaluating
    the model again on the CPU (a minute for CIFAR's 10,000 test images with the paper model on 2 cores)."""
    from cifarray.report import make_report
    from cifarray.train.densenet import save_predictions

    cfg = DenseNetTrainConfig(synthetic=True, synthetic_train_per_class=12, synthetic_test_per_class=3,
                              val_size=200, out=str(densenet_run))
    labels = cfg.data_source().prepare().test.labels
    # Logits that an untrained model would not give: every label right, and class 7 second everywhere.
    logits = torch.full((len(labels), 100), -5.0)
    logits[:, 7] = 0.0
    logits[torch.arange(len(labels)), labels] = 1.0 + labels.float() / 100
    save_predictions(logits, RunDir(densenet_run))
    make_report(densenet_run)
    with open(densenet_run / "per_class_accuracy.csv") as fh:
        assert {r["accuracy"] for r in csv.DictReader(fh)} == {"1.0000"}
    with open(densenet_run / "confused_pairs.csv") as fh:
        assert all(int(p["total"]) == 0 for p in csv.DictReader(fh))
    assert png_size(densenet_run / "inference.png") == (1000, 1100)


def test_dcgan_report(dcgan_run):
    result = run_module("cifarray.report", str(dcgan_run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert png_size(dcgan_run / "curves.png") == (1000, 400)
    assert png_size(dcgan_run / "samples.png") == (274, 274)  # 8 x 8 images of 32 px, 2 px padding
    assert png_size(dcgan_run / "interpolation.png") == (342, 274)  # 8 rows x 10 interpolants


def test_report_errors_are_one_line(tmp_path):
    result = run_cli_here("cifarray.report", str(tmp_path / "nope"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no such run folder" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli_here("cifarray.report", str(tmp_path / "empty"))
    assert result.returncode == 2 and "no config.json" in result.stderr


class Payload:
    """What a crafted weights file would run on a plain torch.load(weights_only=False)."""

    def __reduce__(self):
        return (print, ("payload ran",))


@pytest.mark.parametrize("damage", ["truncated", "crafted", "another model"])
def test_weights_that_do_not_load_are_one_line_errors_for_report_and_eval(tmp_path, densenet_run, dcgan_run, damage):
    for run, name, cli in ((densenet_run, "model.pt", ("cifarray.report",)),
                           (dcgan_run, "generator.pt", ("cifarray.report",)),
                           (dcgan_run, "generator.pt", ("cifarray.eval", "fid"))):
        path = run / name
        if damage == "truncated":  # a full disk, a copy cut short
            path.write_bytes(path.read_bytes()[:1000])
        elif damage == "crafted":
            torch.save({"weight": Payload()}, path)
        else:  # a valid file of another shape
            torch.save(torch.nn.Linear(3, 2).state_dict(), path)
        args = [*cli, str(run)] + (["--inception-weights", str(tmp_path / "inception.pth")] if "eval" in cli else [])
        if "eval" in cli:  # eval checks the run's weights before it needs Inception's
            (tmp_path / "inception.pth").write_bytes(b"")
        result = run_cli_here(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert lines[0].startswith(f"error: {path}:") and "retrain the run" in lines[0], lines[0]
        assert "weights_only=False" not in lines[0] and "payload ran" not in result.stdout + result.stderr
        expected = {"truncated": "truncated or corrupt", "crafted": "refused unread",
                    "another model": "does not fit this run's model"}[damage]
        assert expected in lines[0], lines[0]


def test_the_inference_figures_titles_clear_the_images_above_them():
    """Each image's four title lines (top 3 and the verdict) used to run into the image above."""
    from cifarray.train.densenet import inference_figure

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels, pred = torch.arange(16), torch.arange(16).flip(0)  # every verdict a "true: ..." line
    top3 = [([0.5, 0.3, 0.2], [i, (i + 1) % 100, (i + 2) % 100]) for i in range(16)]
    fig = inference_figure(images, labels, pred, top3, [f"long_class_name_{i}" for i in range(100)], " (procedural)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    boxes = [(ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)) for ax in axes]
    for i, (title, _) in enumerate(boxes[4:], start=4):  # rows 2-4: the image above is in the row before
        above = boxes[i - 4][1]
        assert title.y1 < above.y0, (i, title.y1, above.y0)
    suptitle = fig._suptitle.get_window_extent(renderer)
    assert all(title.y1 < suptitle.y0 for title, _ in boxes[:4])
    from cifarray.figures import pyplot

    pyplot().close(fig)
