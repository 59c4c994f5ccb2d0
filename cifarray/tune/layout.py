"""What a sweep's folder (OUT) holds, by name, and which statuses end a trial: the tuner's constants, once."""

from __future__ import annotations

from pathlib import Path

EXPERIMENT = "tune"  # Tune's experiment folder inside OUT; a stable name lets --resume find it
SWEEP_COPY = "sweep.toml"  # the sweep file as the experiment began
ARGS_FILE = "tune_args.json"  # the tuner's settings that --resume reads back
# The Optuna study: Optuna's journal file, which its docs give as the storage for a shared (NFS) file system, the
# sweep's trials on other nodes writing into OUT (optuna-dashboard OUT/optuna.journal). Sweeps started before kept
# it in SQLite (optuna.db), which Optuna's FAQ advises against on NFS; they resume with it.
STUDY_DB = "optuna.journal"
LEGACY_STUDY_DB = "optuna.db"
SWEEP_CLUSTER = "ray-cluster.json"  # the Ray cluster a running sweep is on, for join jobs (hpc.join.SWEEP_CLUSTER)
TRIALS = "trials"  # OUT/trials/<trial id>: each trial's run folder
DONE = ("complete", "early-stopped", "infeasible", "diverged", "error")  # statuses of a trial that has ended


def trial_dir(out: str | Path, trial_id: str) -> Path:
    return Path(out) / TRIALS / trial_id
