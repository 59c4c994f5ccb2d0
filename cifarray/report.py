"""python -m cifarray.report RUN_DIR: regenerate every figure and table of a training run.

The run's family (summary.json's "model", looked up in `cifarray.registry`) makes them
(its `report` piece, in its module):

densenet: curves.png (loss; train/val accuracy), inference.png (the first 16 test images,
not cherry-picked, with their top-3 classes and confidences), per_class_accuracy.csv,
confused_pairs.csv (the 10 most-confused class pairs on test).
dcgan: curves.png (D/G losses, D outputs, FID when measured), samples.png (8x8 grid from
seed-0 noise, not cherry-picked), interpolation.png (8 rows of linear interpolants between
random latent pairs). Every figure says when the data were procedural.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from cifarray import registry
from cifarray.config import from_dict
from cifarray.errors import UserError, run_cli
from cifarray.rundir import RunDir


def _load(run: RunDir):
    config = run.read_json("config.json")
    summary = run.read_summary() or {}
    if config is None:
        raise UserError(f"{run.path}: no config.json; pass a run folder made by python -m cifarray.train")
    # Runs written before summary.json named the model: the family whose config holds every key of config.json.
    name = summary.get("model") or registry.family_of_config(config)
    family = registry.get(name, where=f"{run.summary}: model")
    return family, from_dict(family.config, config), summary


def make_report(run_dir: str | Path) -> list[Path]:
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{run.path}: no such run folder")
    family, cfg, _ = _load(run)
    return family.display.figures(run, cfg)


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
