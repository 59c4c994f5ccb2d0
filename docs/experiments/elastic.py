"""Elastic sweeps on a real two-node Slurm: the time to the first trial while a node is busy, and the steps trained
twice per node lost, with notice and without.

    sudo .venv/bin/python docs/experiments/elastic.py [--busy 90]

Starts the tests' private two-node Slurm (tests/slurmctl.py: Debian's slurm, munge and MariaDB packages, as root;
`.ci/run` installs them) and runs the small CI sweep (sweeps/ci_cluster.toml, procedural data, one CPU a trial):

1. **First trial while node2 is busy for --busy seconds** (another job holds it): a two-node gang job
   (`sbatch -N 2 slurm/tune_densenet.sh`) against a one-node head on node1 plus a join job queued for node2.
   Seconds from submission to the sweep's first "trial ... started" line, and to the first trial on node2.
2. **Steps trained twice per node lost**: a head on node1, a join job on node2; once a trial on node2 is halfway
   between two checkpoints (every 100 steps), node2 leaves: with notice (`scancel --batch --signal=USR1` of the
   join job: drained), then, with a second join job, without (its Ray processes SIGKILLed). Each trial logs every
   step: the steps trained twice are those the trial had trained (its metrics.csv just before the node left, or
   the drained step) past the step its next attempt began from.

Results: docs/BENCHMARKS.md, "Elastic sweeps".
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from slurmctl import Slurm  # noqa: E402  (the tests' private Slurm)
from test_hpc import PY, ray_processes_of, running_on, sbatch, wait_for  # noqa: E402

JOIN = ["--nodelist=node2", "--cpus-per-task=1", "--gpus-per-node=0"]


def sweep_file(folder: Path, trials: int, steps: int) -> Path:
    text = (REPO / "sweeps" / "ci_cluster.toml").read_text()
    path = folder / "elastic.toml"
    path.write_text(text.replace("trials = 4", f"trials = {trials}").replace("steps = 60", f"steps = {steps}")
                    .replace("grace_period = 59", f"grace_period = {steps - 1}")
                    .replace("eval_every = 20", "eval_every = 100").replace("log_every = 20", "log_every = 1"))
    return path


def head_job(slurm: Slurm, folder: Path, name: str, sweep: Path, nodes: str) -> tuple[str, Path, Path]:
    out, log = folder / name, folder / f"{name}.out"
    where = ["--nodelist=node1", "--cpus-per-task=1"] if nodes == "node1" else ["-N", "2", "--cpus-per-task=1"]
    job = sbatch(slurm, *where, "--gpus-per-node=0", f"--output={log}", "slurm/tune_densenet.sh",
                 "--workers-per-trial", "1",
                 env={"SWEEP": str(sweep), "SYNTHETIC": "1", "OUT": str(out), "GPUS_PER_TRIAL": "0"})
    return job, out, log


def started(log: Path) -> bool:
    try:
        return " started: " in log.read_text()
    except OSError:
        return False


def busy_node2(slurm: Slurm, folder: Path, seconds: int) -> str:
    blocker = sbatch(slurm, "--nodelist=node2", "--cpus-per-task=2", f"--output={folder}/blocker.out",
                     "--wrap", f"sleep {seconds}")
    slurm.wait_state(blocker, {"RUNNING"}, 60)
    return blocker


def end(slurm: Slurm, *jobs: str) -> None:
    slurm.run(["scancel", *jobs], check=False)
    for job in jobs:
        slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 180)


def first_trial(slurm: Slurm, folder: Path, busy: int, elastic: bool) -> tuple[float, float]:
    """(seconds to the first trial, seconds to the first trial on node2), from the head's submission."""
    sweep = sweep_file(folder, trials=4, steps=2000)
    blocker = busy_node2(slurm, folder, busy)
    t0 = time.monotonic()
    job, out, log = head_job(slurm, folder, "elastic" if elastic else "gang", sweep, "node1" if elastic else "2")
    jobs = [job]
    if elastic:
        wait_for(lambda: (out / "ray-cluster.json").exists(), 180, "the sweep's published cluster")
        jobs.append(sbatch(slurm, *JOIN, f"--output={folder}/join.out", "slurm/join.sh", str(out)))
    wait_for(lambda: started(log), busy + 300, "the first trial")
    first = time.monotonic() - t0
    wait_for(lambda: running_on(out, "node2"), busy + 300, "a trial on node2")
    second = time.monotonic() - t0
    end(slurm, *jobs, blocker)
    return first, second


def steps_of(out: Path, trial: str) -> list[tuple[int, int]]:
    with open(out / "trials" / trial / "metrics.csv") as f:
        return [(int(r["attempt"]), int(r["step"])) for r in csv.DictReader(f)]


def at_step(out: Path, trial: str) -> int:
    try:
        rows = steps_of(out, trial)
    except (OSError, KeyError, ValueError):
        return 0
    return rows[-1][1] if rows else 0


def retrained(out: Path, trial: str, left_at: int) -> tuple[int, int, int]:
    """(last step trained before the node left, step the next attempt began from, steps trained twice)."""
    rows = steps_of(out, trial)
    last = max([left_at, *(s for a, s in rows if a == 0)])
    resumed = min(s for a, s in rows if a == 1) - 1
    return last, resumed, last - resumed


def node_lost(slurm: Slurm, folder: Path) -> list[tuple[str, str, int, int, int]]:
    sweep = sweep_file(folder, trials=8, steps=600)
    job, out, log = head_job(slurm, folder, "lost", sweep, "node1")
    wait_for(lambda: (out / "ray-cluster.json").exists(), 180, "the sweep's published cluster")
    lost, taken = [], set()
    for how in ("with notice", "without notice"):
        join = sbatch(slurm, *JOIN, f"--output={folder}/join-{how[:4]}.out", "slurm/join.sh", str(out))
        trial = wait_for(lambda: (t := running_on(out, "node2")) and t not in taken and t, 300, "a trial on node2")
        taken.add(trial)
        # Halfway between two checkpoints (every 100 steps): what a lost node can cost is then visible.
        wait_for(lambda: at_step(out, trial) >= 150 and at_step(out, trial) % 100 >= 50, 300, "step 150")
        left_at = at_step(out, trial)  # a resumed trial's metrics.csv drops the rows past the step it resumed from
        if how == "with notice":
            slurm.run(["scancel", "--batch", "--signal=USR1", join])
        else:
            for pid in ray_processes_of(f"/tmp/ray-{join}-join-node2"):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        slurm.wait_state(join, {"COMPLETED", "FAILED", "CANCELLED"}, 180)
        lost.append((how, trial, left_at))
    slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 900)
    said = [line for line in log.read_text().splitlines() if re.search(r"node node2 (lost|drained);", line)]
    print("\n".join(f"  console: {line}" for line in said), flush=True)
    return [(how, trial, *retrained(out, trial, left_at)) for how, trial, left_at in lost]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--busy", type=int, default=90, help="seconds another job holds node2 (default 90)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("error: the tests' Slurm runs as root: run this as root (sudo)", file=sys.stderr)
        return 2
    root = Path(f"/tmp/cifarray-slurm-{os.getpid()}")
    folder = Path(f"/tmp/cifarray-elastic-{os.getpid()}")
    folder.mkdir()
    slurm = Slurm(root).start()
    jobs = folder / "jobs"
    jobs.mkdir()
    slurm.jobs_dir = jobs
    slurm.job_env = {**slurm.env, "HPC_JOBS_DIR": str(jobs), "PYTHON": PY,
                     "PATH": f"{Path(PY).parent}:{slurm.env['PATH']}"}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    import torch

    from cifarray.device import resolve_precision

    print(f"machine: {cpu}, {os.cpu_count()} cores; Slurm: 2 nodes x 2 CPUs on this host; sweep: ci_cluster.toml "
          f"(procedural data, one CPU a trial, precision auto = {resolve_precision('auto', torch.device('cpu'))})",
          flush=True)
    for name in ("gang", "flex", "lost"):
        (folder / name).mkdir()
    try:
        gang = first_trial(slurm, folder / "gang", args.busy, elastic=False)
        flex = first_trial(slurm, folder / "flex", args.busy, elastic=True)
        print(f"\nfirst trial while node2 is busy for {args.busy} s (seconds from the head's submission)")
        print(f"  {'':22} {'first trial':>12} {'first on node2':>15}")
        print(f"  {'gang job (-N 2)':22} {gang[0]:12.1f} {gang[1]:15.1f}")
        print(f"  {'head + join job':22} {flex[0]:12.1f} {flex[1]:15.1f}")
        print(f"  ratio gang / elastic: first trial x{gang[0] / flex[0]:.1f}", flush=True)
        lost = node_lost(slurm, folder / "lost")
        print("\nsteps trained twice per node lost (checkpoints every 100 steps; node2 leaves at step >= 150)")
        print(f"  {'':16} {'trial':>9} {'last step':>10} {'resumed at':>11} {'trained twice':>14}")
        for how, trial, last, resumed, twice in lost:
            print(f"  {how:16} {trial:>9} {last:10d} {resumed:11d} {twice:14d}")
    finally:
        slurm.drain()
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n(job folders and logs: {folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
