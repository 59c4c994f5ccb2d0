"""A run folder's life: whether it may resume, what is written before training, and what is left after it.

Shared by `python -m cifarray.train` and the tuner's trials: the resume check (a finished run is not trained
again; other settings are refused), the procedural data and config.json, the checkpoints a rerun resumes from,
a diverged run's record, and Ray Train's unregistered checkpoints, removed once the run has finished.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

from cifarray.config import to_dict
from cifarray.errors import UserError
from cifarray.rundir import RunDir

RAY_RUN_NAME = "ray"  # RUN_DIR/ray holds Ray Train's checkpoints; a stable name lets reruns find them


class TrainingDiverged(UserError):
    pass


def check_resumable(run: RunDir, resolved: dict, cfg) -> bool:
    """True when RUN_DIR already holds this run finished; raises if it holds a different one."""
    saved = run.read_json("config.json")
    if saved is None:
        return False
    # May change between attempts without changing what is trained (graphs change how a step runs, not its maths).
    # cpus_per_worker: how many CPUs (threads) run it, which a sweep resumed on another allocation recomputes.
    ignore = {"max_failures", "log_every", "cuda_graphs", "cpus_per_worker"}
    # A setting added after the run was written is absent from its config.json: the run used its default.
    defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                for f in dataclasses.fields(cfg) if f.name not in saved}
    diff = sorted(k for k in set(saved) | set(resolved)
                  if k not in ignore and saved.get(k, defaults.get(k)) != resolved.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k, defaults.get(k))!r} -> {resolved.get(k)!r}" for k in diff[:4])
        raise UserError(f"{run.path} holds a run with other settings ({shown}); pass another --out, "
                        "or rerun with the same settings to resume it")
    summary = run.read_summary()
    return bool(summary and summary.get("status") == "complete")


def prepare_run(cfg) -> tuple[RunDir, dict, bool]:
    """The run folder: resume check, then procedural data and config.json (data already checked by the caller)."""
    run, resolved, done = resume_state(cfg)
    if not done:
        write_run(run, resolved, cfg)
    return run, resolved, done


def resume_state(cfg) -> tuple[RunDir, dict, bool]:
    """(run folder, resolved config, finished already?), writing nothing: a refused run leaves --out as it was."""
    run = RunDir(cfg.out)
    resolved = to_dict(cfg) | {"out": str(run.path)}
    return run, resolved, check_resumable(run, resolved, cfg)


def write_run(run: RunDir, resolved: dict, cfg) -> None:
    """Procedural data (when asked for) and config.json: what a rerun resumes against."""
    cfg.data_source().write()  # procedural data only
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_json("config.json", resolved)


def check_checkpoints(run: RunDir) -> None:
    """Name each of the run's checkpoints that does not load (the workers skip it and resume from the one before);
    when none loads, a one-line error with the fix, before Ray starts."""
    from cifarray.train.checkpoint import checkpoint_folders, load_resume_point

    found = checkpoint_folders(run.path / RAY_RUN_NAME)
    if found:
        load_resume_point(found[0], say=lambda line: print(line, flush=True))


def drop_unregistered_checkpoints(run: RunDir) -> list[str]:
    """Delete the RUN_DIR/ray/checkpoint_* folders that Ray Train's checkpoint manager does not list.

    A worker writes its checkpoint before the controller registers it (at its next poll, every 2 s),
    so a worker killed in between leaves a folder that Ray never deletes: num_to_keep counts only the
    registered ones. Called once a run has finished; without a readable snapshot nothing is deleted."""
    storage = run.path / RAY_RUN_NAME
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        kept = {c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not kept:
        return []
    dropped = [d.name for d in storage.glob("checkpoint_*") if d.is_dir() and d.name not in kept]
    for name in dropped:
        shutil.rmtree(storage / name, ignore_errors=True)
    return dropped


def divergence_error(run: RunDir, diverged: dict) -> TrainingDiverged:
    last = diverged["last_checkpoint_step"]
    kept = (f"the last good checkpoint (step {last}) is kept in {run.path / RAY_RUN_NAME}" if last
            else "no checkpoint had been saved yet")
    return TrainingDiverged(f"training diverged: loss became {diverged['loss']} at step {diverged['step']}; {kept}; "
                            "lower --lr and pass another --out")
