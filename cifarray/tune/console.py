"""The sweep's console: a Ray Tune `Callback` that renders trials with Rich.

On a TTY: a live table (id, status, batch, lr, k, layout, params, step, objective)
under a header with the best objective, resources in use, elapsed time and ETA.
Elsewhere (Slurm logs): one line per trial event and a status line every 30 s, each one line whatever its
length.
The same callback keeps OUT/trials.csv current (at most WRITE_EVERY seconds behind), so a killed sweep leaves it
behind.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ray.tune import Callback

from cifarray.train.checkpoint import checkpoint_folders
from cifarray.tune.elastic import NodeLoss, Nodes, quiet_node_losses
from cifarray.tune.layout import DONE
from cifarray.tune.results import resources_line, trial_status, write_trials
from cifarray.tune.trial import BASELINE, INFEASIBLE

LEFT = ("trial", "status", "layout")  # left-aligned columns
# trials.csv holds every trial, so writing it on every event cost the driver time in proportion to the sweep's size,
# per trial: at most this often instead (and once more at the end).
WRITE_EVERY = 1.0


def fmt(v: Any, spec: str = "") -> str:
    if v is None or v == "":
        return ""
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


class SweepConsole(Callback):
    """Renders the sweep and keeps trial bookkeeping; Tune's own output is off (verbose=0)."""

    def __init__(self, out: str, sweep: Any, metric: str, mode: str, label: str, total: int, concurrent: int = 1,
                 console: Console | None = None, live: bool | None = None):
        self.out, self.sweep = out, sweep
        self.model, self.metric, self.mode, self.label = sweep.model, metric, mode, label
        self.max_steps, self.total, self.defaults, self.concurrent = sweep.steps, total, sweep.train, concurrent
        self._console, self._live_flag = console, live
        self._reset()

    def _reset(self) -> None:
        self.console = self._console or Console()
        self.live_enabled = sys.stdout.isatty() if self._live_flag is None else self._live_flag
        self.started = time.time()
        self._live = None
        self._last_render = self._last_line = self._resources_at = self._written = 0.0
        self._dirty = False
        self._resources_text = ""
        self.trials: list = []
        self.durations: list[float] = []
        self._starts: dict[str, float] = {}
        self.nodes, self.node_loss = Nodes(), NodeLoss()  # the cluster's nodes as they come and go
        self._recovering: set[str] = set()
        # Ended trials whose Tune checkpoints wait for two experiment snapshots (see get_state).
        self._ended: list = []
        self._ended_before_snapshot: list = []
        quiet_node_losses()

    # Tune pickles its RunConfig, callbacks included, so that Tuner.restore brings this console back:
    # the terminal handles and timers are this process's and are made afresh.
    def __getstate__(self) -> dict:
        return {"out": self.out, "sweep": self.sweep, "metric": self.metric, "mode": self.mode, "label": self.label,
                "total": self.total, "concurrent": self.concurrent}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # ----- what the table shows
    def value(self, trial: Any) -> float | None:
        """The trial's best objective so far (Tune's own running max/min; None for infeasible trials)."""
        result = trial.last_result or {}
        if result.get(INFEASIBLE) or result.get("diverged"):
            return None
        v = (getattr(trial, "metric_analysis", None) or {}).get(self.metric, {}).get(self.mode)
        return float(v) if isinstance(v, (int, float)) else None

    def best(self) -> tuple[Any, float] | None:
        scored = [(t, self.value(t)) for t in self.trials if self.value(t) is not None]
        if not scored:
            return None
        return (max if self.mode == "max" else min)(scored, key=lambda tv: tv[1])

    def row(self, trial: Any) -> list[str]:
        c = {**self.defaults, **trial.config}
        r = trial.last_result or {}
        cells = [trial.trial_id + ("*" if trial.config.get(BASELINE) else ""), trial_status(trial, self.max_steps)]
        for _, value in self.columns():
            v = value(c)
            cells.append(fmt(v, ".3g") if isinstance(v, float) else fmt(v))
        cells.append(fmt(c.get("params"), ","))
        best = self.value(trial)
        return cells + [fmt(r.get("step", "")), fmt(best, ".4g")]

    def columns(self) -> tuple:
        """The family's columns between status and params (header, function of the trial's config)."""
        return self.sweep.rules.columns(list(self.sweep.space))

    def header(self) -> str:
        elapsed = time.time() - self.started
        done = sum(trial_status(t, self.max_steps) in DONE for t in self.trials)
        best = self.best()
        best_text = f"best {self.label}: {best[1]:.4g} ({best[0].trial_id})" if best else f"best {self.label}: -"
        eta = ""
        if self.durations and done < self.total:
            mean = sum(self.durations) / len(self.durations)
            eta = f"  ETA ~{_clock(mean * (self.total - done) / max(1, self.concurrent))}"
        now = time.time()
        if now - self._resources_at > 5:
            self._resources_text, self._resources_at = resources_line(), now
        return (f"{best_text}  |  trials {done}/{self.total} done  |  {self._resources_text}  |  "
                f"elapsed {_clock(elapsed)}{eta}")

    def table(self) -> Table:
        cols = ("trial", "status", *(name for name, _ in self.columns()), "params", "step", self.metric)
        baseline = any(t.config.get(BASELINE) for t in self.trials)
        table = Table(title=None, expand=False, show_lines=False,
                      caption="* the sweep's baseline ([baseline] in its sweep file)" if baseline else None)
        for name in cols:
            table.add_column(name, justify="left" if name in LEFT else "right")
        for t in self.trials:
            table.add_row(*self.row(t))
        return table

    def renderable(self) -> Group:
        return Group(Text(self.header(), style="bold"), self.table())

    # ----- Tune callback hooks
    def setup(self, **info: Any) -> None:
        if self.live_enabled:
            from rich.live import Live

            self._live = Live(self.renderable(), console=self.console, auto_refresh=False, transient=False)
            self._live.start()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials = trials
        self.node_loss.seen(trial)
        if trial.trial_id in self._recovering:  # a retry after a lost or drained node: the same trial, continued
            self._recovering.discard(trial.trial_id)
            return
        self._starts[trial.trial_id] = time.time()
        self._event(f"trial {trial.trial_id}{self._baseline(trial)} started: {self._describe(trial)}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials = trials
        self._recovering.add(trial.trial_id)
        for line in self.nodes.poll(force=True):  # the node's own line ("left") before the trial's
            self._event(line)
        self._event(self.node_loss.on_recover(trial, self.nodes))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.trials = trials
        self.node_loss.reported(trial, result)
        if result.get("drained"):
            self._event(f"trial {trial.trial_id} saved at step {result.get('step')} on draining "
                        f"{self.nodes.name(result.get('ray_node'))}")
            return
        self._changed()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials = trials
        self._ended.append(trial)
        started = self._starts.pop(trial.trial_id, None)
        if started is not None and not (trial.last_result or {}).get(INFEASIBLE):
            self.durations.append(time.time() - started)
        status = trial_status(trial, self.max_steps, ended=True)
        best = self.value(trial)
        extra = f", best {self.metric} {best:.4g}" if best is not None else ""
        params = trial.config.get("params")
        reason = f" ({trial.config.get(INFEASIBLE)})" if status == "infeasible" else ""
        name = f"trial {trial.trial_id}{self._baseline(trial)}"
        self._event(f"{name} {status}{reason} at step {(trial.last_result or {}).get('step', 0)}{extra}; "
                    f"{params:,} params" if isinstance(params, int) else f"{name} {status}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials = trials
        self._starts.pop(trial.trial_id, None)
        self._event(f"trial {trial.trial_id} failed; its error is in {trial.local_path or 'the trial folder'}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.trials = trials
        for line in self.nodes.poll():
            self._event(line)
        self._write()
        now = time.time()
        if self._live is not None and now - self._last_render >= 1.0:
            self._render()
        elif self._live is None and now - self._last_line >= 30:
            self._last_line = now
            self.console.print(self.header(), highlight=False, soft_wrap=True)

    def get_state(self) -> None:
        """Tune calls this while it snapshots the experiment, once the snapshot's trial states are written.

        An ended trial's Tune checkpoints go only once a snapshot that holds it as ended has been stored: until
        then, a killed sweep's resume takes it for unfinished and restores it from them (Ray's "Could not
        recover from checkpoint as it does not exist on storage anymore", seen in the confirmation's SIGKILL
        test). The trials that had ended by the last snapshot go now: that snapshot's upload (Tune copies it
        to OUT/tune after this call) had a whole snapshot period, 10 s or more, to finish."""
        for trial in self._ended_before_snapshot:
            drop_checkpoints(trial)
        self._ended_before_snapshot, self._ended = self._ended, []
        return None  # nothing of the console's own to restore (Tune pickles it whole)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # After Tune's last snapshot, which it waits for: every trial it holds as ended loses its checkpoints,
        # those of a killed earlier run of this sweep too.
        for trial in trials:
            if trial.status == "TERMINATED":
                drop_checkpoints(trial)
        self._ended_before_snapshot, self._ended = [], []
        for line in self.nodes.poll(force=True):  # a node that left in the sweep's last seconds is said too
            self._event(line)
        self.trials = trials
        self._dirty = True
        self._write(now=True)
        if self._live is not None:
            self._render()
            self._live.stop()
            self._live = None

    # ----- output
    def _describe(self, trial: Any) -> str:
        return "  ".join(f"{k}={fmt(v, '.3g') if isinstance(v, float) else v}" for k, v in trial.config.items()
                         if k not in (INFEASIBLE, BASELINE))

    @staticmethod
    def _baseline(trial: Any) -> str:
        return " (baseline)" if trial.config.get(BASELINE) else ""

    def _event(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, highlight=False, soft_wrap=True)
            self._render()
        else:
            # soft_wrap: one line whatever its length. Off a TTY (a Slurm .out file) Rich would wrap at 80 columns,
            # and grep would find half of each event.
            self.console.print(line, highlight=False, soft_wrap=True)
        self._changed()

    def _changed(self) -> None:
        self._dirty = True
        self._write()

    def _write(self, now: bool = False) -> None:
        """trials.csv, if anything changed since it was last written and WRITE_EVERY has passed (or `now`)."""
        if self._dirty and (now or time.time() - self._written >= WRITE_EVERY):
            write_trials(Path(self.out), self.sweep, self.trials, self.metric, self.mode)
            self._dirty, self._written = False, time.time()

    def _render(self) -> None:
        self._last_render = time.time()
        self._live.update(self.renderable(), refresh=True)


def drop_checkpoints(trial: Any) -> None:
    """Remove the Tune checkpoints (OUT/tune/<trial>/checkpoint_*, the in-actor runner's) of a trial that has ended:
    a resume continues only unfinished and failed trials, and the trial's results are in OUT/trials/<id>. They were
    most of what a long sweep left in OUT/tune (two checkpoints a trial: 136 KB of 168 KB for a 5,260-parameter
    DenseNet)."""
    path = getattr(trial, "path", None)
    if not path or "://" in str(path):  # Tune's storage is OUT, a local or shared file system; nothing else is ours
        return
    for folder in checkpoint_folders(Path(path)):
        shutil.rmtree(folder, ignore_errors=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"
