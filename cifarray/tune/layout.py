"""What a sweep's folder (OUT) holds, by name, and which statuses end a trial: the tuner's constants, once."""

from __future__ import annotations

from pathlib import Path

EXPERIMENT = "tune"  # Tune's experiment folder inside OUT; a stable name lets --resume find it
SWEEP_COPY = "sweep.toml"  # the sweep file as the experiment began
ARGS_FILE = "tune_args.json"  # the tuner's settings that --resume reads back
STUDY_DB = "optuna.db"  # the Optuna study (SQLite): optuna-dashboard sqlite:///OUT/optuna.db
TRIALS = "trials"  # OUT/trials/<trial id>: each trial's run folder
DONE = ("complete", "early-stopped", "infeasible", "diverged", "error")  # statuses of a trial that has ended


def trial_dir(out: str | Path, trial_id: str) -> Path:
    return Path(out) / TRIALS / trial_id
