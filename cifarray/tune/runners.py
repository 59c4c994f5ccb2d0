"""Where a sweep's trials train: one object per trial runner, holding all that differs between them.

- `InActor` (`tune`): a one-worker trial trains in its own Tune actor, which Tune reuses for the next trial
  (imports, the CUDA context and the data set are then paid once per actor). Its checkpoints are Tune's
  (OUT/tune/<trial>/checkpoint_*), which the sweep's console removes once the trial has ended.
- `ThroughTrainer` (`train`): the trial's actor is a driver that builds and fits a TorchTrainer (DDP workers, the
  Ray 2.60 Train + Tune pattern). Its checkpoints are Ray Train's (OUT/trials/<id>/ray), whose unregistered
  folders are removed once the trial has finished.

The name (`tune`, `train`) is what a sweep file, `--trial-runner` and OUT/tune_args.json say; `trial_runner` turns
it (or `auto`) into the object.
"""

from __future__ import annotations

from typing import Any

from cifarray.errors import UserError

DRIVER_CPU = 0.01  # what a TorchTrainer trial's driver holds; each of its workers asks for that much less


class TrialRunner:
    name: str
    reuse_actors: bool  # Tune 2.60 reuses a function trainable's actor only when asked (measured: 8 processes
    # for 8 trials without it, 2 with it)
    how: str  # for the sweep's first line

    def resources(self, cpus_per_worker: int, gpus_per_trial: float) -> dict[str, float]:
        """What Tune reserves for one trial's actor."""
        raise NotImplementedError

    def train(self, sweep: Any, cfg: Any, run: Any, resolved: dict, context: Any, gpus_per_worker: float) -> None:
        """Train the trial's run to its end (or to where Tune stops it), resuming from its own checkpoints."""
        raise NotImplementedError

    def finished(self, run: Any) -> None:
        """After a trial that finished: remove what only a resume would have needed."""


class InActor(TrialRunner):
    name, reuse_actors, how = "tune", True, "in their own Tune actors (reused)"

    def resources(self, cpus_per_worker: int, gpus_per_trial: float) -> dict[str, float]:
        return {"CPU": cpus_per_worker, **({"GPU": gpus_per_trial} if gpus_per_trial else {})}

    def train(self, sweep, cfg, run, resolved, context, gpus_per_worker) -> None:
        from cifarray.train.engine import train
        from cifarray.train.session import TuneSession

        try:
            train(sweep.family, resolved, TuneSession(cfg.gpu), context)
        finally:  # also when Tune ends the thread after the final report (SystemExit)
            TuneSession.release()


class ThroughTrainer(TrialRunner):
    name, reuse_actors, how = "train", False, "through TorchTrainer"

    def resources(self, cpus_per_worker: int, gpus_per_trial: float) -> dict[str, float]:
        # The driver only waits on its trainer; Tune cannot place a trial that asks for nothing, so it holds a
        # sliver of a CPU that its workers give up (see `train`): a trial then takes exactly workers x
        # cpus_per_worker CPUs, and 2 one-CPU trials fit on 2 CPUs.
        return {"CPU": DRIVER_CPU}

    def train(self, sweep, cfg, run, resolved, context, gpus_per_worker) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from cifarray.train.engine import TrainLoop
        from cifarray.train.launch import build_trainer

        # Each worker gives up the driver's whole sliver: a worker may share a node with the driver, and on nodes
        # of one CPU (a worker each) a share of it would leave the driver's node short (measured: the trial waited).
        cpus = (cfg.cpus_per_worker or 1) - DRIVER_CPU
        trainer = build_trainer(cfg, run, TrainLoop(sweep.family, context), resolved, cpus,
                                callbacks=[TuneReportCallback()], gpus=gpus_per_worker)
        trainer.fit()

    def finished(self, run: Any) -> None:
        from cifarray.train.runfolder import drop_unregistered_checkpoints

        drop_unregistered_checkpoints(run)


RUNNERS: dict[str, TrialRunner] = {r.name: r for r in (InActor(), ThroughTrainer())}


def trial_runner(asked: str, workers: int) -> TrialRunner:
    """auto: a one-worker trial trains in its own Tune actor; a DDP trial needs a TorchTrainer's workers."""
    if asked == "auto":
        return RUNNERS["tune" if workers == 1 else "train"]
    if asked == "tune" and workers > 1:
        raise UserError(f"--trial-runner tune trains one worker inside each trial's actor, but a trial has {workers} "
                        "workers; pass --trial-runner train (or auto) for DDP trials, or --workers-per-trial 1")
    return RUNNERS[asked]
