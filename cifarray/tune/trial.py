"""One Tune trial: a one-worker trial trains inside its own Tune actor; a DDP trial is a Tune driver function
that builds a TorchTrainer (the Ray 2.60 Train + Tune pattern).

The trial checks the sampled config against the parameter budget first. An over-budget config is reported
to Tune as infeasible at step 0 and never trains; Optuna learns the boundary from the constraint the sampler
recorded. A feasible config trains in OUT/trials/<trial id> with the same engine as `python -m cifarray.train`,
so a restarted trial resumes from its own checkpoints (Tune's, in OUT/tune/<trial>/, for in-actor trials;
Ray Train's, in OUT/trials/<trial id>/ray/, for TorchTrainer trials).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from cifarray.family import Objective, RunContext
from cifarray.train.workerlog import quiet_worker_exits
from cifarray.tune.layout import trial_dir
from cifarray.tune.runners import RUNNERS, TrialRunner
from cifarray.tune.sweep import Sweep

# A trial's actor imports this module when it unpickles the trainable, as the actor is created: Tune may end an actor
# by SIGTERM before it runs any trial (one it started for a trial that a reused actor then took), and Ray's handler's
# SystemExit in a weakref callback would print a traceback (measured: the elastic Slurm test, under the suite's
# two processes). In the driver it is as harmless.
quiet_worker_exits()

INFEASIBLE = "infeasible"
CONSTRAINT = "params_over_budget"
BASELINE = "baseline"  # in the config of the sweep's [baseline] trial (the searcher's first, enqueued in Optuna)
CONFIRMED = "confirm"  # in the config of a confirmation run: the name of the configuration it confirms
NOT_SAMPLED = ("params", INFEASIBLE, BASELINE, CONFIRMED)  # what a trial's config holds besides its values of the
# space (a confirmation run's seed is a config value: it trains with it)


def sampled_values(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's values of the space, from its Tune config."""
    return {k: v for k, v in config.items() if k not in NOT_SAMPLED}


class SpaceSampler:
    """Optuna define-by-run space: sample, count parameters exactly, record the budget constraint."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep

    def __call__(self, trial: Any) -> dict[str, Any]:
        from cifarray.errors import UserError

        sampled = self.sweep.sample(trial)
        overrides = self.sweep.overrides(sampled)
        try:
            params = self.sweep.params_of(overrides)
            reason = "" if params <= self.sweep.budget else f"{params:,} parameters > budget {self.sweep.budget:,}"
        except UserError as exc:  # a combination the model cannot build, e.g. too many blocks to downsample
            params, reason = -1, str(exc)
        # Optuna's constraint API: a value > 0 marks the trial infeasible, so TPE learns where the budget ends.
        trial.set_constraint(CONSTRAINT, float(params - self.sweep.budget) if params >= 0 else 1.0)
        return {"params": params, INFEASIBLE: reason}


def run_trial(config: dict[str, Any], sweep: Sweep, base: dict[str, Any], out: str, objective: Objective,
              context: RunContext, runner: TrialRunner = RUNNERS["train"], gpus_per_worker: float = 1.0) -> None:
    """The Tune trainable: train the sampled config (or refuse it), as `runner` trains (cifarray.tune.runners)."""
    import time

    from ray import tune

    entered = time.time()
    quiet_worker_exits()  # every trial's actor, an infeasible one's too, also where sys.unraisablehook was reset
    trial_id = tune.get_context().get_trial_id()
    metric = objective.metric
    if config.get(INFEASIBLE):
        # No trainer, no worker, no step: the result Optuna and ASHA see is the worst value at step 0.
        tune.report({"step": 0, metric: objective.worst, INFEASIBLE: True, "params": config["params"]})
        return
    from cifarray.config import from_dict
    from cifarray.train.runfolder import prepare_run

    sampled = sampled_values(config)
    cfg = from_dict(sweep.cls, {**base, **sweep.overrides(sampled), "out": str(trial_dir(out, trial_id))})
    run, resolved, done = prepare_run(cfg)
    if done:  # finished before the driver was killed, but Tune never heard: tell it now
        tune.report(final_result(run, objective))
        return
    # The trial's own timestamps (bench sweep: its wall against its training seconds), and where it ran.
    run.write_json("trial.json", {"entered": entered, "runner": runner.name, "pid": os.getpid(),
                                  "process_started": _process_started()})
    trial_context = replace(context, sweep_trial=True, objective=objective)
    runner.train(sweep, cfg, run, resolved, trial_context, gpus_per_worker)
    if not run.read_summary():
        if run.take_divergence():  # the engine reported it, with the objective at its worst (a second report of
            return  # the same step made Optuna warn "step=N is already reported" in the sweep's output)
        raise RuntimeError(f"trial {trial_id} ended without a summary.json in {run.path}")
    runner.finished(run)


def _process_started() -> float | None:
    """When this process (the trial's actor) started, as a Unix time: the first trial in an actor pays its start."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil comes with ray[default]; without it the bench just lacks that figure
        return None


def final_result(run, objective: Objective) -> dict[str, Any]:
    """What a finished trial's final report said, from its metrics.csv (the last step, the last measured objective)."""
    from cifarray.rundir import read_metrics

    rows = read_metrics(run.metrics)
    measured = run.last_measured(objective.metric)  # the last row need not have measured it
    return {"step": int(rows[-1]["step"]) if rows else 0,
            objective.metric: measured[1] if measured else objective.worst}
