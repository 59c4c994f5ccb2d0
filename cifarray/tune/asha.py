"""ASHA that keeps its rungs across `--resume`.

Tune restores a resumed experiment's searcher (Optuna) from its own checkpoint, but its scheduler is
the one pickled when the sweep began, with empty rungs; it then hands the scheduler every restored
trial through `on_trial_add`. Without the records of the trials that finished before the interruption,
a trial reaching a rung after the resume would be compared only with results reported since, and its
early-stopping decision could differ from an uninterrupted sweep's. A finished trial's reports are in
its own `metrics.csv` (every evaluation, the objective included), so they are replayed here through
ASHA's own `on_trial_result` and `on_trial_complete`: the rungs hold what they held before.

A restored unfinished trial also asks for what the trainable it was restored with gives a trial (this
allocation's plan), not what it asked for in the first run: Tune keeps a restored trial's resources, and on an
allocation with fewer CPUs per trial it would wait for ever. The sweep folder is the one this process runs the
sweep in (`cifarray.tune.searcher.bind`), not the path the scheduler was pickled with.
"""

from __future__ import annotations

import math

from ray.tune.schedulers import ASHAScheduler

from cifarray.rundir import read_metrics
from cifarray.tune.layout import trial_dir


class ResumableASHA(ASHAScheduler):
    def __init__(self, *, out: str, **kwargs):
        super().__init__(**kwargs)
        self._out = out  # the sweep folder: trials/<trial id>/metrics.csv

    def reported(self, trial_id: str) -> list[dict[str, float]]:
        """What the trial reported to Tune: (time, objective) at each evaluation, from its metrics.csv."""
        results = []
        for row in read_metrics(trial_dir(self._out, trial_id) / "metrics.csv"):
            try:
                value = float(row.get(self._metric) or "nan")
            except ValueError:
                continue
            if not math.isnan(value):
                results.append({self._time_attr: int(row[self._time_attr]), self._metric: value})
        return results

    def __setstate__(self, state: dict) -> None:
        from cifarray.tune.searcher import bound

        self.__dict__.update(state)
        self._out = str(bound().out)

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.status != "TERMINATED":  # new, or unfinished and about to continue: it reports again
            self._follow_plan(trial)
            return
        results = self.reported(trial.trial_id)  # none for an infeasible trial: it never reached a rung
        for result in results:
            self.on_trial_result(tune_controller, trial, result)
        if results:
            self.on_trial_complete(tune_controller, trial, results[-1])

    @staticmethod
    def _follow_plan(trial) -> None:
        if trial.status != "PENDING":
            return
        trainable = trial.get_trainable_cls()
        wanted = trainable.default_resource_request(trial.config) if trainable else None
        if wanted is not None and wanted != trial.placement_group_factory:
            trial.update_resources(wanted)
