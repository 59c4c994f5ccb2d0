"""What the training CLI shows while a run trains: rank 0's metrics.csv, as a Rich bar on a TTY, plain lines
otherwise (Slurm logs)."""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable

from cifarray.rundir import RunDir, measured, read_metrics


class Progress:
    """Render rank 0's metrics.csv while training runs: a Rich bar on a TTY, plain lines otherwise."""

    def __init__(self, run: RunDir, total: int, keys: tuple[str, ...], interval: float = 1.0):
        self.run, self.total, self.keys, self.interval = run, total, keys, interval
        self._stop = threading.Event()
        self._seen = len(read_metrics(run.metrics))
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._last: dict[str, float] = {}
        self.tty = sys.stdout.isatty()

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _fmt(self, row: dict[str, str]) -> str:
        parts = []
        for k in self.keys:
            if measured(row, k):  # shown until measured again (validation runs every --eval-every steps)
                self._last[k] = float(row[k])
            if k in self._last:
                parts.append(f"{k} {self._last[k]:.4g}")
        return "  ".join(parts)

    def _loop(self) -> None:
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            display = Bar(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                          TextColumn("{task.description}"), TimeRemainingColumn(), transient=False)
            task = display.add_task("", total=self.total)

            def show(row: dict[str, str]) -> None:
                display.update(task, completed=int(row["step"]), description=self._fmt(row))
        else:
            display = contextlib.nullcontext()

            def show(row: dict[str, str]) -> None:
                print(f"step {int(row['step']):>7d}/{self.total}  {self._fmt(row)}", flush=True)
        with display:
            while True:
                stopping = self._stop.is_set()
                self._tick(show, every_row=not self.tty)  # a bar shows the newest row; logs show every row
                if stopping:
                    return  # that was the last look, after training ended
                self._stop.wait(self.interval)

    def _tick(self, show: Callable[[dict[str, str]], None], every_row: bool = False) -> None:
        rows = read_metrics(self.run.metrics)
        new = rows[self._seen:] if len(rows) >= self._seen else rows
        self._seen = len(rows)
        for row in (new if every_row else new[-1:]):
            show(row)
