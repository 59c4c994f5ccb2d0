"""Checkpoints: what one holds, how a rank hands one to its runner, and which one a run resumes from.

A checkpoint is a folder holding `state.pt`: every stateful component's state_dict and the step it was taken
at. Rank 0 writes it into a temporary folder and hands it to its session (`cifarray.train.session`), whose
runner persists it (Ray Train and the local session into RUN_DIR/ray, Tune into OUT/tune/<trial>). A run resumes
from the newest one that loads (`load_resume_point`), whichever runner wrote it.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from cifarray.rundir import RunDir

CHECKPOINT_FILE = "state.pt"
LOCAL_NAME = re.compile(r"checkpoint_\d{7}")  # the local runner's folders (Ray Train names its by date)


def send_result(session, run: RunDir, metrics: dict[str, Any], state: dict[str, Any] | None, rank: int) -> None:
    """Report to the session's runner (all ranks must call); rank 0 attaches the checkpoint and records its step.

    Metrics that are not yet measured (NaN) are left out. last_checkpoint.json is written after the
    report returned, i.e. once the runner has persisted the checkpoint; Ray Train registers it when its
    controller next polls, so a crash within that window resumes from the one before.
    """
    metrics = {k: v for k, v in metrics.items() if v == v}
    if state is None or rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        session.report(metrics, tmp)
    run.record_checkpoint(state["step"])


def checkpoint_folders(*parents: Path | None) -> list[Path]:
    """The checkpoint folders (checkpoint_*) in those of `parents` that exist, the newest first: by age, not by name
    (Ray Train names its folders by date, the local runner by step, and both may share RUN_DIR/ray)."""
    found = {d for p in parents if p is not None and p.is_dir() for d in p.glob("checkpoint_*") if d.is_dir()}
    return sorted(found, key=lambda d: (d.stat().st_mtime, d.name), reverse=True)


def checkpoint_candidates(latest: Path | None, also: Path | None = None) -> list[Path]:
    """Where a run may resume from, in order: the runner's newest checkpoint folder, then every other folder beside
    it and in `also` (the run's own checkpoint folder), the newest first.

    One exception puts a folder before the runner's: one the local runner wrote (`checkpoint_<step>`) after it. A
    run that went from Ray Train to the local runner and back resumes from the newest checkpoint, which Ray's own
    record does not know. (Ray's folders that it persisted but never registered keep their place after its pick.)"""
    by_age = checkpoint_folders(latest and latest.parent, also)
    if latest is None:
        return by_age
    since = latest.stat().st_mtime
    head = [d for d in by_age if LOCAL_NAME.fullmatch(d.name) and d.stat().st_mtime > since] + [latest]
    return head + [d for d in by_age if d not in head]


def load_resume_point(latest: Path | None, say=None, also: Path | None = None) -> dict[str, Any] | None:
    """The state of the newest checkpoint that loads, skipping (and naming, through `say`) those that do not.

    A truncated or corrupt checkpoint (a full disk, a flaky network file system) costs the steps since the one
    before it, not the run; when none loads, a UserError says so with the fix."""
    from cifarray.errors import UserError
    from cifarray.rundir import torch_load_problem

    candidates = checkpoint_candidates(latest, also)
    why = ""
    for folder in candidates:
        state, why = torch_load_problem(folder / CHECKPOINT_FILE)
        if why is None and not (isinstance(state, dict) and "step" in state):
            why = "not a cifarray checkpoint (no step)"
        if why is None:
            return state
        if say is not None:
            say(f"note: checkpoint {folder} does not load ({why}); skipped")
    if not candidates:
        return None
    raise UserError(f"no checkpoint of this run loads ({len(candidates)} in {candidates[0].parent}; the newest: "
                    f"{why}); move {candidates[0].parent} aside to train the run again from step 0, or pass another "
                    "--out")


def restore(components: dict[str, Any], session, also: Path | None = None) -> int:
    """Load the newest loadable checkpoint into named stateful components; returns its step (0: none).

    `also`: the run's checkpoint folder (RUN_DIR/ray), searched besides the runner's own."""
    state = load_resume_point(session.latest_checkpoint(), also=also,
                              say=lambda line: print(line, file=sys.stderr, flush=True))
    if state is None:
        return 0
    for name, component in components.items():
        component.load_state_dict(state[name])
    return int(state["step"])


def snapshot(components: dict[str, Any], step: int) -> dict[str, Any]:
    """Checkpoint state: every component's state_dict, and the step it was taken at."""
    return {"step": step, **{name: component.state_dict() for name, component in components.items()}}
