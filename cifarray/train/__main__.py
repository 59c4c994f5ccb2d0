"""python -m cifarray.train FAMILY [flags] [--config FILE]   (FAMILY: densenet, dcgan, or a registered one)

Flags may also come from a TOML file (--config): defaults, then the file, then the
command line. Rerunning the same command with the same --out resumes the run.
--workers auto: one DDP worker per GPU of the Ray cluster (and --gpu), else one per node.
--runner auto (the default) trains one worker in this process with no Ray (`local`) unless a Ray cluster is
named (--address, $RAY_ADDRESS) or the run has several workers; `ray` forces a Ray Train TorchTrainer.
One run at a time per --out: a second one exits naming the first (--force-unlock takes over
a lock left by a run on another host that is known to be gone).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

from cifarray.config import add_arguments, load_toml, resolve
from cifarray import registry
from cifarray.errors import run_cli
from cifarray.train import launch

AUTO = "auto"


class Parsed(NamedTuple):
    job: str
    cfg: object
    auto: bool  # --workers auto
    force_unlock: bool
    runner: str  # local | ray: what --runner picked for this job
    address: str | None  # --address


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifarray.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="job", required=True)
    for name, family in registry.FAMILIES.items():
        p = sub.add_parser(name, help=f"train {family.display.description or name}", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # helps name their defaults
        p.add_argument("--config", metavar="FILE", help="TOML file of flags (keys as flag names)")
        p.add_argument("--force-unlock", action="store_true",
                       help="take over --out's lock although its holder, on another host, may still run")
        p.add_argument("--runner", choices=launch.RUNNERS, default="auto",
                       help="local: one worker in this process, no Ray; ray: a Ray Train TorchTrainer; auto "
                            "(default): local for one worker with no Ray cluster named, else ray")
        p.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (when not given: $RAY_ADDRESS, "
                                         "else a local one, or none with the local runner)")
        add_arguments(p, family.config)
    return parser


def parse(argv: Sequence[str] | None = None) -> Parsed:
    args = parser().parse_args(argv)
    values = vars(args)
    job, config_file, force = values.pop("job"), values.pop("config"), values.pop("force_unlock")
    asked, address = values.pop("runner"), values.pop("address")
    file_values = load_toml(config_file) if config_file else {}
    # --workers auto: sized to the Ray cluster once it is joined (cluster.scale_to_cluster)
    auto = AUTO in (values.get("workers"), file_values.get("workers"))
    if auto:
        values["workers"] = None
        file_values.pop("workers", None)
    cfg = resolve(registry.get(job).config, file_values, values, source=config_file or "config file")
    return Parsed(job, cfg, auto, force, launch.pick_runner(asked, cfg.workers, auto, address), address)


def main(argv: Sequence[str] | None = None) -> int:
    job, cfg, auto, force, runner, address = parse(argv)
    if address:
        os.environ["RAY_ADDRESS"] = address  # as $RAY_ADDRESS, for the checks and ray.init (cifarray.train.cluster)
    from cifarray.phases import mark
    from cifarray.report import make_report
    from cifarray.runlock import RunLock
    from cifarray.train import cluster

    mark("imported")
    family = registry.get(job)
    n_train = launch.check_inputs(cfg, family, auto, runner)  # every input error before Ray and the lock
    mark("checked")
    with RunLock(cfg.out, f"python -m cifarray.train {job}", force=force):
        if auto:
            cfg = cluster.scale_to_cluster(cfg)
            cfg.data_source().check_fits(cfg.batch_size, cfg.workers, n_train)
        summary = launch.fit(cfg, family, runner=runner)
        figures = make_report(cfg.out)  # the same as `python -m cifarray.report RUN_DIR`
    mark("reported")
    print(f"figures and tables: {', '.join(p.name for p in figures)} in {Path(cfg.out).resolve()}")
    print(json.dumps({k: summary.get(k) for k in family.display.summary_keys or summary}))
    return 0


if __name__ == "__main__":
    run_cli(main)
