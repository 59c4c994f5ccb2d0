"""python -m cifarray.report RUN_DIR: regenerate every figure and table of a training run.

The run's family (summary.json's "model", looked up in `cifarray.registry`) makes them:

densenet: curves.png (loss; train/val accuracy), inference.png (the first 16 test images,
not cherry-picked, with their top-3 classes and confidences), per_class_accuracy.csv,
confused_pairs.csv (the 10 most-confused class pairs on test).
dcgan: curves.png (D/G losses, D outputs, FID when measured), samples.png (8x8 grid from
seed-0 noise, not cherry-picked), interpolation.png (8 rows of linear interpolants between
random latent pairs). Every figure says when the data were procedural.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cifarray.errors import UserError, run_cli


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _column(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "", "nan")]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.array([]), np.array([]))


def curves(run, rows: list[dict], panels: list[tuple[str, list[str]]], title: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=100)
    for ax, (label, keys) in zip(np.atleast_1d(axes), panels):
        for key in keys:
            x, y = _column(rows, key)
            if len(x):
                ax.plot(x, y, marker="o" if len(x) < 30 else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = run.path / "curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _load(run):
    from cifarray import registry
    from cifarray.config import from_dict

    config = run.read_json("config.json")
    summary = run.read_json("summary.json") or {}
    if config is None:
        raise UserError(f"{run.path}: no config.json; pass a run folder made by python -m cifarray.train")
    # Runs written before summary.json named the model: a DCGAN config has lr_g.
    family = registry.get(summary.get("model") or ("dcgan" if "lr_g" in config else "densenet"),
                          where=f"{run.summary}: model")
    return family, from_dict(family.config, config), summary


def densenet_report(run, cfg) -> list[Path]:
    from cifarray.eval.classifier import evaluate, load_finished
    from cifarray.rundir import read_metrics
    from cifarray.train.densenet import build_model

    weights = run.path / "model.pt"
    if not weights.is_file():
        raise UserError(f"{run.path}: no model.pt; the run has not finished (rerun its training command)")
    tag = " (procedural data)" if cfg.synthetic else ""
    out = [curves(run, read_metrics(run.metrics), [("loss", ["loss"]), ("accuracy", ["train_acc", "val_acc"])],
                   f"DenseNet k={cfg.growth_rate} blocks={','.join(map(str, cfg.blocks))}{tag}")]
    model, data, aug = load_finished(run, cfg, build_model)
    _, logits = evaluate(model, data.test, aug, torch.device("cpu"))
    probs = logits.softmax(1)
    pred, labels, names = probs.argmax(1), data.test.labels, data.class_names
    n = len(names)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    with open(run.path / "per_class_accuracy.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "name", "test_images", "accuracy"])
        for c in range(n):
            total = int(confusion[c].sum())
            w.writerow([c, names[c], total, f"{confusion[c, c].item() / total:.4f}" if total else ""])
    pairs = (confusion + confusion.T).triu(1)  # unordered pairs: a taken for b plus b taken for a
    top = torch.topk(pairs.flatten(), k=min(10, n * (n - 1) // 2))
    with open(run.path / "confused_pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class_a", "class_b", "a_as_b", "b_as_a", "total"])
        for value, flat in zip(top.values.tolist(), top.indices.tolist()):
            a, b = divmod(flat, n)
            w.writerow([names[a], names[b], int(confusion[a, b]), int(confusion[b, a]), value])
    out += [run.path / "per_class_accuracy.csv", run.path / "confused_pairs.csv"]
    plt = _plt()
    fig, axes = plt.subplots(4, 4, figsize=(10, 11), dpi=100)
    top3 = probs.topk(3, dim=1)
    for i, ax in enumerate(axes.flat):
        ax.imshow(data.test.images[i].permute(1, 2, 0).numpy())
        ax.axis("off")
        lines = [f"{names[c][:18]} {p:.0%}" for p, c in zip(top3.values[i].tolist(), top3.indices[i].tolist())]
        ok = "ok" if pred[i] == labels[i] else f"true: {names[int(labels[i])][:16]}"
        ax.set_title("\n".join(lines + [ok]), fontsize=7)
    fig.suptitle(f"first 16 test images, top-3 predictions{tag}")
    fig.tight_layout()
    fig.savefig(run.path / "inference.png")
    plt.close(fig)
    return out + [run.path / "inference.png"]


def dcgan_report(run, cfg) -> list[Path]:
    from torchvision.utils import save_image

    from cifarray.models.dcgan import Generator
    from cifarray.rundir import read_metrics

    weights = run.path / "generator.pt"
    if not weights.is_file():
        raise UserError(f"{run.path}: no generator.pt; the run has not finished (rerun its training command)")
    rows = read_metrics(run.metrics)
    panels = [("loss", ["loss_d", "loss_g"]), ("D output", ["d_real", "d_fake"])]
    if any(r.get("fid") not in (None, "", "nan") for r in rows):
        panels.append(("FID", ["fid"]))
    out = [curves(run, rows, panels, "DCGAN" + (" (procedural data)" if cfg.synthetic else ""))]
    g = Generator(cfg.model_config())
    g.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    g.eval()
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.randn(64, cfg.z_dim, generator=rng)
        save_image((g(z) + 1) / 2, run.path / "samples.png", nrow=8, padding=2)
        ends = torch.randn(2, 8, cfg.z_dim, generator=rng)
        t = torch.linspace(0, 1, 10).view(1, 10, 1)
        path = ends[0].unsqueeze(1) * (1 - t) + ends[1].unsqueeze(1) * t  # (8 rows, 10 steps, z)
        save_image((g(path.reshape(80, -1)) + 1) / 2, run.path / "interpolation.png", nrow=10, padding=2)
    return out + [run.path / "samples.png", run.path / "interpolation.png"]


def make_report(run_dir: str | Path) -> list[Path]:
    from cifarray.rundir import RunDir

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{run.path}: no such run folder")
    family, cfg, _ = _load(run)
    return family.report(run, cfg)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifarray.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for path in make_report(args.run_dir):
        print(path)
    return 0


if __name__ == "__main__":
    run_cli(main)
