"""python -m cifarray.tune: one Ray Tune experiment (Optuna TPE + ASHA) over a sweep file.

    python -m cifarray.tune --sweep sweeps/densenet_100k.toml --data-dir ~/data --out runs/tune
    python -m cifarray.tune --sweep sweeps/quickstart.toml --synthetic --out runs/quick
    python -m cifarray.tune --out runs/tune --resume          # after an interruption or a requeue

A one-worker trial trains inside its own Tune actor, which Tune reuses for the next
trial (--trial-runner auto|tune); a trial of several DDP workers is a Tune driver that
builds a TorchTrainer (--trial-runner train). Each trains in OUT/trials/<trial id>.
Configs over the parameter budget get no training step:
they are reported infeasible and Optuna's constraint API teaches TPE the boundary.
ASHA stops weak trials on validation accuracy (or FID). The test split is used once,
after the sweep, on the best trial. Outputs: OUT/trials.csv, OUT/summary.json,
OUT/val_vs_params.png, OUT/learning_curves.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from cifarray.data.synth import synthetic_for_run
from cifarray.errors import UserError, run_cli
from cifarray.tune import results
from cifarray.tune.sweep import TRIAL_RUNNERS, Sweep, default_sweep, load
from cifarray.tune.trial import DRIVER_CPU

EXPERIMENT = "tune"  # Tune's experiment folder inside OUT; a stable name lets --resume find it
SWEEP_COPY = "sweep.toml"
ARGS_FILE = "tune_args.json"
RESUME_KEYS = ("data_dir", "synthetic", "no_verify", "workers_per_trial", "gpus_per_trial", "cpus_per_trial",
               "max_concurrent", "trials", "trial_runner")  # what --resume reads back from OUT when not given again


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifarray.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", help="sweep file (TOML; default: the shipped sweeps/densenet_100k.toml)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-dir", help="folder holding cifar-100-python/ or its .tar.gz")
    data.add_argument("--synthetic", action="store_true", help="procedural CIFAR-format data, written once to OUT/data")
    p.add_argument("--no-verify", action="store_true", help="skip the md5 check of --data-dir")
    p.add_argument("--out", help="experiment folder (default runs/tune-<sweep name>)")
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"),
                   help="continue the experiment in --out (finished trials are kept); --resume=auto: continue "
                   "it if --out holds one, else start it (for batch jobs that may be requeued)")
    p.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--max-concurrent", type=int, help="cap on trials at once (default: what the cluster fits)")
    p.add_argument("--gpus-per-trial", default="0", help="GPUs per trial: one per DDP worker, or a fraction <= 1 "
                   "for a one-worker trial (0.25: four trials share a GPU); default 0; auto: 1 if the Ray cluster "
                   "has GPUs, else 0")
    p.add_argument("--workers-per-trial", type=int, help="DDP workers per trial (default: GPUs per trial, or 1)")
    p.add_argument("--cpus-per-trial", type=int, help="CPUs per trial, split across its workers (default: 1 per "
                   "worker on CPU; the node's CPUs shared out on GPU)")
    p.add_argument("--trials", type=int, help="override the sweep file's number of trials")
    p.add_argument("--trial-runner", choices=TRIAL_RUNNERS,
                   help="where a trial trains: tune (inside its own Tune actor, reused across trials: no per-trial "
                   "start-up; one worker), train (a TorchTrainer per trial: DDP workers), or auto (tune for "
                   "one-worker trials, train for --workers-per-trial > 1); default: the sweep file's trial_runner, "
                   "else auto")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over --out's lock although its holder, on another host, may still run")
    return p


def main(argv: list[str] | None = None) -> int:
    from cifarray.runlock import RunLock

    args = parser().parse_args(argv)
    out = Path(args.out or f"runs/tune-{Path(args.sweep or default_sweep()).stem}").expanduser().resolve()
    # One sweep per folder at a time; everything below reads or writes OUT, so it runs under the lock.
    with RunLock(out, "python -m cifarray.tune", force=args.force_unlock):
        return _main(args, out)


def _main(args, out: Path) -> int:
    experiment = out / EXPERIMENT
    saved = _json(out / ARGS_FILE)
    if args.resume == "auto":
        args.resume = saved is not None and experiment.exists()
    args.auto_gpus = args.gpus_per_trial == "auto"  # decided in run(), once the Ray cluster is joined
    try:
        args.gpus_per_trial = 0 if args.auto_gpus else float(args.gpus_per_trial)
    except ValueError:
        raise UserError(f"--gpus-per-trial must be a number or auto, got {args.gpus_per_trial!r}") from None
    if args.resume:
        if saved is None or not experiment.exists():
            raise UserError(f"--resume: {out} holds no experiment to resume; run without --resume to start one")
        if args.sweep and Path(args.sweep).resolve() != (out / SWEEP_COPY).resolve():
            sweep_now = load(args.sweep)
            if _canon(sweep_now) != _canon(load(out / SWEEP_COPY)):
                raise UserError(f"--resume: {args.sweep} differs from the sweep of {out} ({out / SWEEP_COPY}); "
                                "drop --sweep to resume, or pass another --out")
        sweep = load(out / SWEEP_COPY)
        if args.trials is not None and args.trials != (saved.get("trials") or sweep.trials):
            raise UserError("--trials cannot change when resuming: the experiment keeps its own count")
        # Experiments from before --trial-runner existed ran every trial through a TorchTrainer.
        was = saved.get("trial_runner") or "train"
        if args.trial_runner is not None and args.trial_runner != was:
            raise UserError(f"--trial-runner cannot change when resuming: {out} runs its trials with {was} "
                            "(unfinished trials continue from that runner's checkpoints); drop --trial-runner")
        args.trial_runner = was
        for key in RESUME_KEYS:  # the experiment's own settings, unless given again
            if getattr(args, key) in (None, False, 0) and saved.get(key) not in (None, False):
                setattr(args, key, saved[key])
    else:
        sweep = load(args.sweep or default_sweep())
        if experiment.exists():
            raise UserError(f"{out} already holds an experiment; pass --resume to continue it, or another --out")
    if not args.synthetic and not args.data_dir:
        raise UserError("no data given: pass --data-dir DIR (real CIFAR-100) or --synthetic (procedural data)")
    for name in ("max_concurrent", "workers_per_trial", "cpus_per_trial", "trials"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    workers = trial_workers(args.gpus_per_trial, args.workers_per_trial)
    args.trial_runner = trial_runner(args.trial_runner or sweep.trial_runner, workers)
    trials = args.trials or sweep.trials
    batches = [sweep.base.batch_size]
    if "batch_size" in sweep.space and sweep.space["batch_size"].kind == "choice":
        batches = list(sweep.space["batch_size"].values)
    odd = [b for b in batches if b % workers]
    if odd:
        raise UserError(f"batch size {odd[0]} is not divisible by {workers} workers per trial; "
                        "change the sweep's batch sizes or --workers-per-trial")

    from cifarray.train.launch import check_local_gpus, check_reachable

    if args.address or os.environ.get("RAY_ADDRESS"):
        check_reachable(args.address or os.environ["RAY_ADDRESS"])  # before anything is written to OUT
    check_local_gpus(args.gpus_per_trial, args.address, f"--gpus-per-trial {args.gpus_per_trial:g}",
                     "pass --gpus-per-trial 0 (or auto), or --address of a Ray cluster with GPUs")
    data_dir = _check_data(args, sweep, out, workers)  # before Ray: missing, corrupt or too small data fails here

    def save() -> None:
        """What the experiment is made of, written once the Ray cluster is known to hold its trials: a sweep
        refused for resources leaves OUT as it found it."""
        if args.synthetic and not (data_dir / "cifar-100-python" / "meta").exists():
            base = sweep.base
            synthetic_for_run(data_dir, train_per_class=base.synthetic_train_per_class,
                              test_per_class=base.synthetic_test_per_class, seed=sweep.seed,
                              difficulty=base.synthetic_difficulty)
        if not args.resume:
            shutil.copyfile(sweep.source, out / SWEEP_COPY)
            (out / ARGS_FILE).write_text(json.dumps({**{k: getattr(args, k) for k in RESUME_KEYS},
                                                     "sweep": str(Path(sweep.source).resolve())}, indent=2))

    return run(args, sweep, out, data_dir, workers, trials, save)


def trial_workers(gpus_per_trial: float, workers_per_trial: int | None) -> int:
    """DDP workers per trial, checked against --gpus-per-trial (whole GPUs, one per worker, or a fraction
    of one GPU for a one-worker trial)."""
    g = gpus_per_trial
    if g < 0:
        raise UserError("--gpus-per-trial must be >= 0")
    workers = workers_per_trial or max(1, int(g))
    if 0 < g < 1:
        if workers > 1:
            raise UserError(f"--gpus-per-trial {g:g} with --workers-per-trial {workers}: a fraction of a GPU is for "
                            "one-worker trials (NCCL refuses two ranks on one GPU); pass --workers-per-trial 1, or "
                            f"--gpus-per-trial {workers} (one GPU per worker)")
    elif g and (g != int(g) or g != workers):
        raise UserError(f"--gpus-per-trial {g:g} must equal --workers-per-trial {workers} (one GPU per DDP "
                        "worker), or be a fraction <= 1 for one-worker trials")
    return workers


def trial_runner(asked: str, workers: int) -> str:
    """auto: a one-worker trial trains in its own Tune actor; a DDP trial needs a TorchTrainer's workers."""
    if asked == "auto":
        return "tune" if workers == 1 else "train"
    if asked == "tune" and workers > 1:
        raise UserError(f"--trial-runner tune trains one worker inside each trial's actor, but a trial has {workers} "
                        "workers; pass --trial-runner train (or auto) for DDP trials, or --workers-per-trial 1")
    return asked


def plan(cpus: int, gpus: float, gpus_per_trial: float, workers: int, cpus_per_trial: int | None,
         max_concurrent: int | None, trials: int) -> tuple[int, int]:
    """(trials at once, CPUs per worker) on a cluster of `cpus` and `gpus`.

    With GPUs, concurrency follows GPUs / GPUs per trial (0.25: four trials per GPU) and the CPUs are
    shared out among the trials that fit; without, each worker gets --cpus-per-trial / workers CPUs.
    """
    if gpus_per_trial:
        if gpus < gpus_per_trial:
            raise UserError(f"--gpus-per-trial {gpus_per_trial:g} but the Ray cluster has {gpus:g} GPU(s); "
                            "lower it or run on GPU nodes")
        fit_by = int(gpus / gpus_per_trial + 1e-9)
        cpus_per_worker = max(1, (cpus_per_trial or cpus // fit_by) // workers)
        fit_by = min(fit_by, cpus // (cpus_per_worker * workers))  # every trial still needs its CPUs
    else:
        cpus_per_worker = max(1, (cpus_per_trial or workers) // workers)
        fit_by = cpus // (cpus_per_worker * workers)
    if fit_by < 1:
        raise UserError(f"one trial needs {workers * cpus_per_worker} CPUs but the Ray cluster has {cpus}; "
                        "lower --workers-per-trial or --cpus-per-trial")
    return min(fit_by, max_concurrent or fit_by, trials), cpus_per_worker


def trial_resources(runner: str, cpus_per_worker: int, gpus_per_trial: float) -> dict[str, float]:
    """What Tune reserves for one trial's actor.

    In-actor trials hold their own CPUs and GPU share. A TorchTrainer trial's driver only waits on its trainer;
    Tune cannot place a trial that asks for nothing, so it holds a sliver of a CPU that its workers give up (see
    run_trial): a trial then takes exactly workers x cpus_per_worker CPUs, and 2 one-CPU trials fit on 2 CPUs."""
    if runner == "tune":
        return {"CPU": cpus_per_worker, **({"GPU": gpus_per_trial} if gpus_per_trial else {})}
    return {"CPU": DRIVER_CPU}


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _canon(sweep: Sweep) -> str:
    return repr((sweep.model, sweep.trials, sweep.seed, sorted(sweep.train.items()), sorted(sweep.space.items()),
                 sweep.grace_period, sweep.reduction_factor))


def _largest(sweep: Sweep, key: str) -> int:
    """The largest value of an integer setting that a trial can sample (or the fixed one)."""
    p = sweep.space.get(key)
    if p is None:
        return getattr(sweep.base, key)
    return max(p.values) if p.kind == "choice" else p.values[1]


def _check_data(args, sweep: Sweep, out: Path, workers: int) -> Path:
    """Check the data, and that every trial config the sweep can sample fits it; returns where it is (procedural
    data: where it is written, by `save` in _main)."""
    from types import SimpleNamespace

    from cifarray.train.launch import check_data_fits, training_images

    base = sweep.base
    data = out / "data" if args.synthetic else Path(args.data_dir).expanduser().resolve()
    n_train, source = training_images(args.synthetic, base.synthetic_train_per_class, data, args.no_verify)
    worst = SimpleNamespace(val_size=_largest(sweep, "val_size"), batch_size=_largest(sweep, "batch_size"),
                            workers=workers)
    check_data_fits(worst, n_train, source,
                    flag=lambda key: f"the sweep's {'largest ' if key in sweep.space else ''}{key}")
    return data


def run(args, sweep: Sweep, out: Path, data_dir: Path, workers: int, trials: int,
        save: Callable[[], None]) -> int:
    # Tune snapshots the experiment at most this often; a killed sweep loses at most these seconds of bookkeeping.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch
    import optuna

    from cifarray.train import launch
    from cifarray.tune.asha import ResumableASHA
    from cifarray.tune.console import SweepConsole
    from cifarray.tune.trial import SpaceSampler, run_trial

    context = sweep.family.driver_context(sweep.base)  # e.g. the DCGAN's Inception weights, resolved once
    goal = sweep.family.objective(context)
    metric, mode, label = goal.metric, goal.mode, goal.label

    # With the dashboard: Ray Train's placement-group cleaner asks its state API whether a trial's controller
    # is gone; without it, a trial that Tune ends keeps its workers' CPUs reserved and later trials starve.
    launch.init_ray(None, dashboard=True)
    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), float(res.get("GPU", 0))
    if args.auto_gpus and gpus and workers == 1:
        args.gpus_per_trial = 1
    concurrent, cpus_per_worker = plan(cpus, gpus, args.gpus_per_trial, workers, args.cpus_per_trial,
                                       args.max_concurrent, trials)
    # Totals can hold a trial whose workers no single node holds; Tune would wait for it without end.
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if launch.workers_that_fit(nodes, cpus_per_worker, args.gpus_per_trial / workers) < workers:
        gpu = f" and {args.gpus_per_trial / workers:g} GPU" if args.gpus_per_trial else ""
        raise UserError(f"a trial's {workers} worker(s) with {cpus_per_worker} CPU(s){gpu} each do not fit this Ray "
                        f"cluster's nodes ({launch.describe_cluster(nodes)}): a worker runs on one node; lower "
                        "--cpus-per-trial, or raise --workers-per-trial to spread a trial over nodes")
    save()

    base = {**sweep.train, "data_dir": str(data_dir), "synthetic": False,
            "no_verify": True if args.synthetic else args.no_verify, "workers": workers,
            "gpu": bool(args.gpus_per_trial), "cpus_per_worker": cpus_per_worker,
            "checkpoint_every": sweep.eval_every}  # every report carries a checkpoint and the objective
    runner = args.trial_runner
    trainable = tune.with_parameters(run_trial, sweep=sweep, base=base, out=str(out), metric=metric, mode=mode,
                                     context=context, runner=runner, gpus_per_worker=args.gpus_per_trial / workers)
    trainable = tune.with_resources(trainable, trial_resources(runner, cpus_per_worker, args.gpus_per_trial))

    console = SweepConsole(str(out), sweep, metric, mode, label, trials, concurrent=concurrent)
    # In-actor trials checkpoint through Tune (OUT/tune/<trial>/checkpoint_*): the two newest are kept, as Ray
    # Train keeps them for TorchTrainer trials (their checkpoints live in OUT/trials/<id>/ray).
    run_config = tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0, callbacks=[console],
                                failure_config=tune.FailureConfig(max_failures=1),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    print(f"sweep {Path(sweep.source).name}: {sweep.model}, {trials} trials, objective {label} ({mode}), "
          f"budget {sweep.budget:,} params; ASHA grace {sweep.grace_period} steps, reduction x{sweep.reduction_factor}, "
          f"max {sweep.steps} steps; {concurrent} trial(s) at once, {workers} worker(s) x "
          f"{f'{args.gpus_per_trial / workers:g} GPU' if args.gpus_per_trial else f'{cpus_per_worker} CPU'} each; "
          f"trials {'in their own Tune actors (reused)' if runner == 'tune' else 'through TorchTrainer'}; out {out}",
          flush=True)
    started = time.time()
    if args.resume:
        # The saved RunConfig comes back with it, console callback included (see SweepConsole.__getstate__).
        tuner = tune.Tuner.restore(str(out / EXPERIMENT), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        print(f"resuming {out / EXPERIMENT}: finished trials are kept, unfinished ones continue from "
              "their checkpoints", flush=True)
    else:
        sampler = optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=min(10, max(2, trials // 3)))
        search = OptunaSearch(space=SpaceSampler(sweep), metric=metric, mode=mode, sampler=sampler)
        scheduler = ResumableASHA(out=str(out), time_attr="step", metric=metric, mode=mode, max_t=sweep.steps,
                                  grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)
        # reuse_actors: Tune 2.60 reuses a function trainable's actor only when asked (measured: 8 processes for 8
        # trials without it, 2 with it); then imports, the CUDA context and the data set are paid once per actor.
        tuner = tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
            search_alg=search, scheduler=scheduler, num_samples=trials, max_concurrent_trials=concurrent,
            reuse_actors=runner == "tune"))
    tuner.fit()
    summary = results.finish(out, sweep, metric, mode, label, data_dir=data_dir, synthetic=bool(args.synthetic),
                             seconds=time.time() - started, requested=trials)
    results.print_summary(summary)
    return 130 if summary["status"] == "interrupted" else 0  # Ctrl-C: Tune stops the sweep and returns


if __name__ == "__main__":
    sys.exit(run_cli(main))
