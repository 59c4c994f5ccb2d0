"""python -m cifarray.train {densenet,dcgan} [flags] [--config FILE]

Flags may also come from a TOML file (--config): defaults, then the file, then the
command line. Rerunning the same command with the same --out resumes the run.
--workers auto: one DDP worker per GPU of the Ray cluster (and --gpu), else one per node.
One run at a time per --out: a second one exits naming the first (--force-unlock takes over
a lock left by a run on another host that is known to be gone).
"""

from __future__ import annotations

import argparse
import json
from typing import NamedTuple, Sequence

from cifarray.config import add_arguments, load_toml, resolve
from cifarray.errors import run_cli
from cifarray.train.config import DCGANTrainConfig, DenseNetTrainConfig

AUTO = "auto"
JOBS = {"densenet": DenseNetTrainConfig, "dcgan": DCGANTrainConfig}


class Parsed(NamedTuple):
    job: str
    cfg: object
    auto: bool  # --workers auto
    force_unlock: bool


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifarray.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="job", required=True)
    for name, cls in JOBS.items():
        p = sub.add_parser(name, help=f"train the {name}", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # helps name their defaults
        p.add_argument("--config", metavar="FILE", help="TOML file of flags (keys as flag names)")
        p.add_argument("--force-unlock", action="store_true",
                       help="take over --out's lock although its holder, on another host, may still run")
        add_arguments(p, cls)
    return parser


def parse(argv: Sequence[str] | None = None) -> Parsed:
    args = parser().parse_args(argv)
    values = vars(args)
    job, config_file, force = values.pop("job"), values.pop("config"), values.pop("force_unlock")
    file_values = load_toml(config_file) if config_file else {}
    # --workers auto: sized to the Ray cluster once it is joined (launch.scale_to_cluster)
    auto = AUTO in (values.get("workers"), file_values.get("workers"))
    if auto:
        values["workers"] = None
        file_values.pop("workers", None)
    return Parsed(job, resolve(JOBS[job], file_values, values, source=config_file or "config file"), auto, force)


def main(argv: Sequence[str] | None = None) -> int:
    job, cfg, auto, force = parse(argv)
    from cifarray.runlock import RunLock
    from cifarray.train import launch

    n_train = launch.check_inputs(cfg, cfg.model_config())  # every input error before Ray and the lock
    with RunLock(cfg.out, f"python -m cifarray.train {job}", force=force):
        if auto:
            cfg = launch.scale_to_cluster(cfg)
            launch.check_data_fits(cfg, n_train, cfg.data_dir or "the procedural data set")
        if job == "densenet":
            from cifarray.train.densenet import train_densenet

            summary = launch.fit(cfg, train_densenet, cfg.model_config(), "densenet",
                                 ("loss", "train_acc", "val_acc", "images_per_s"))
            keys = ("params", "steps", "seconds", "images_per_s", "val_acc", "test_acc")
        else:
            from cifarray.train.dcgan import fid_weights_for_training, train_dcgan

            summary = launch.fit(cfg, train_dcgan, cfg.model_config(), "dcgan",
                                 ("loss_d", "loss_g", "d_real", "d_fake", "fid", "images_per_s"),
                                 extra={"_fid_weights": fid_weights_for_training(cfg)})
            keys = ("params_g", "params_d", "steps", "seconds", "images_per_s", "best_fid", "best_fid_step")
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0


if __name__ == "__main__":
    run_cli(main)
