"""The run folder and its metrics file: what training writes and the report, tuner and bench read.

Standard library only at import, so that everything above it (training, tuning, reports, benchmarks) can
read a run folder without importing torch, Ray or each other; `load_torch` imports torch when called.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any


# What fixes a run's weights or predictions file that does not load.
RETRAIN = "retrain the run (its training command, with another --out) or restore the file from a copy"


SUMMARY = "summary.json"  # a finished run's results (status complete), and a run's only "done" mark
LAST_CHECKPOINT = "last_checkpoint.json"  # {"step": N}: the newest checkpoint rank 0 saw persisted
ATTEMPTS = "attempts.json"  # {"attempts": N}: how many times the training function started in the folder
DIVERGED = "diverged.json"  # {"step", "loss", "last_checkpoint_step"}: a NaN/inf loss, for the driver to report


def replace_text(path: Path, text: str) -> None:
    """Write `path` through a hidden temporary file beside it: readers, and a kill mid-write, never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json_or_none(path: Path) -> Any:
    """A JSON file's contents, or None when it is missing or not JSON (half written by a kill, say)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RunDir:
    """RUN_DIR layout: config.json, metrics.csv, summary.json, model files, workers/, ray/ (checkpoints).

    The run folder is the protocol between the driver, the workers, the tuner and the report: the files that say
    where a run stands (summary, last checkpoint, attempts, divergence) are read and written through these accessors
    only (tests/test_layering.py checks that no other module spells their names)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.csv")
    summary = property(lambda self: self.path / SUMMARY)
    workers = property(lambda self: self.path / "workers")
    data = property(lambda self: self.path / "data")

    def read_summary(self) -> dict | None:
        return self.read_json(SUMMARY)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json(SUMMARY, summary)

    def last_measured(self, key: str) -> tuple[int, float] | None:
        """(step, value) of the last metrics.csv row that measured `key` (validation rows only, for an objective)."""
        rows = [row for row in read_metrics(self.metrics) if measured(row, key)]
        return (int(rows[-1]["step"]), float(rows[-1][key])) if rows else None

    def last_checkpoint_step(self) -> int | None:
        """The step of the newest checkpoint known persisted, or None before the first."""
        last = self.read_json(LAST_CHECKPOINT)
        return last["step"] if last else None

    def record_checkpoint(self, step: int) -> None:
        self.write_json(LAST_CHECKPOINT, {"step": step})

    def next_attempt(self) -> int:
        """Counts a start of the training function in this folder; returns how many came before (0 first)."""
        seen = self.read_json(ATTEMPTS) or {"attempts": 0}
        self.write_json(ATTEMPTS, {"attempts": seen["attempts"] + 1})
        return seen["attempts"]

    def record_divergence(self, step: int, loss: float) -> None:
        self.write_json(DIVERGED, {"step": step, "loss": str(loss),
                                   "last_checkpoint_step": self.last_checkpoint_step()})

    def take_divergence(self) -> dict | None:
        """A diverged run's record (step, loss, last checkpoint's step), moved aside to diverged-step<N>.json so that
        a rerun on the folder is not taken for diverged; None when the run did not diverge."""
        diverged = self.read_json(DIVERGED)
        if diverged:
            (self.path / DIVERGED).rename(self.path / f"diverged-step{diverged['step']}.json")
        return diverged

    def write_json(self, name: str, obj: Any) -> None:
        replace_text(self.path / name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str) -> dict | None:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None


class MetricsLog:
    """metrics.csv, appended by rank 0; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        with open(self.path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def torch_load_problem(path: Path) -> tuple[object, str | None]:
    """(what `torch.load(path, weights_only=True)` gives, or None; why it fails in a few words, or None).

    torch's own messages are not shown: for a refused global they advise weights_only=False, which would run
    whatever the file holds."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except FileNotFoundError:
        return None, "no such file"
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # torch's restricted unpickler refused to look one up
            return None, ("it holds objects other than tensors and plain values (crafted, or not written by "
                          "cifarray); refused unread")
        return None, "corrupt: not a torch file"  # e.g. "Unsupported operand": bytes that are no pickle
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        return None, f"truncated or corrupt: {first}"


def load_torch(path: Path, what: str, fix: str) -> object:
    """A tensor file a run wrote (weights, predictions), loaded safely; a UserError naming it when it does not load."""
    from cifarray.errors import UserError

    value, problem = torch_load_problem(path)
    if problem is not None:
        raise UserError(f"{path}: cannot load {what}: {problem}; {fix}")
    return value


def load_state_into(module, path: Path, what: str, fix: str) -> None:
    """`module.load_state_dict` from a run's weights file; a UserError when the file does not load or does not fit."""
    from cifarray.errors import UserError

    state = load_torch(path, what, fix)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"{path}: {what} does not fit this run's model (config.json): {first}; {fix}") from None


def measured(row: dict[str, Any], key: str) -> bool:
    """Whether a metrics.csv (or trials.csv) cell holds a measured value: an unmeasured one is empty or nan."""
    return row.get(key) not in (None, "", "nan")


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
