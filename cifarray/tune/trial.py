"""One Tune trial: the Ray 2.60 pattern of a Tune driver function that builds a TorchTrainer.

The driver checks the sampled config against the parameter budget first. An
over-budget config is reported to Tune as infeasible at step 0 and never reaches a
trainer; Optuna learns the boundary from the constraint the sampler recorded. A
feasible config trains in OUT/trials/<trial id> with the same trainer code as
`python -m cifarray.train`, so a restarted trial resumes from its own checkpoints.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from cifarray.train.engine import RunContext
from cifarray.tune.sweep import Sweep

INFEASIBLE = "infeasible"
CONSTRAINT = "params_over_budget"
DRIVER_CPU = 0.01  # what a trial's driver holds; its workers ask for that much less between them


def worst(mode: str) -> float:
    return 0.0 if mode == "max" else 1e9


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


def run_trial(config: dict[str, Any], sweep: Sweep, base: dict[str, Any], out: str, metric: str, mode: str,
              context: RunContext, gpus_per_worker: float = 1.0) -> None:
    """The Tune trainable: a driver that builds and fits the trial's TorchTrainer (or refuses it)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if config.get(INFEASIBLE):
        # No trainer, no worker, no step: the result Optuna and ASHA see is the worst value at step 0.
        tune.report({"step": 0, metric: worst(mode), INFEASIBLE: True, "params": config["params"]})
        return
    from cifarray.config import from_dict
    from cifarray.train import launch
    from cifarray.rundir import RunDir

    sampled = {k: v for k, v in config.items() if k not in ("params", INFEASIBLE)}
    cfg = from_dict(sweep.cls, {**base, **sweep.overrides(sampled), "out": str(Path(out) / "trials" / trial_id)})
    run, resolved, done = launch.prepare_run(cfg, sweep.family)
    if done:  # finished before the driver was killed, but Tune never heard: tell it now
        tune.report(final_result(run, metric, mode))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    cpus = (cfg.cpus_per_worker or 1) - DRIVER_CPU / cfg.workers
    train_fn = sweep.family.train_fn(replace(context, sweep_trial=True))
    trainer = launch.build_trainer(cfg, run, train_fn, resolved, cpus, callbacks=[TuneReportCallback()],
                                   gpus=gpus_per_worker)
    trainer.fit()
    if not RunDir(cfg.out).read_json("summary.json"):
        diverged = run.read_json("diverged.json")
        if diverged:
            tune.report({"step": int(diverged["step"]), metric: worst(mode), "diverged": True})
            return
        raise RuntimeError(f"trial {trial_id} ended without a summary.json in {run.path}")
    launch.drop_unregistered_checkpoints(run)


def final_result(run, metric: str, mode: str) -> dict[str, Any]:
    from cifarray.rundir import read_metrics

    rows = read_metrics(run.metrics)
    last = rows[-1] if rows else {}
    result = {"step": int(last.get("step", 0))}
    for row in reversed(rows):
        if row.get(metric) not in (None, "", "nan"):
            result[metric] = float(row[metric])
            break
    result.setdefault(metric, worst(mode))
    return result
