"""The run folder and its metrics file: what training writes and the report, tuner and bench read.

Standard library only, so that everything above it (training, tuning, reports, benchmarks) can
read a run folder without importing torch, Ray or each other.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any


class RunDir:
    """RUN_DIR layout: config.json, metrics.csv, summary.json, model files, workers/, ray/ (checkpoints)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.csv")
    summary = property(lambda self: self.path / "summary.json")
    workers = property(lambda self: self.path / "workers")
    data = property(lambda self: self.path / "data")

    def write_json(self, name: str, obj: Any) -> None:
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, target)  # readers never see half a file

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


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
