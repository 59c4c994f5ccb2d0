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

--confirm K:S (or the sweep file's confirm) then retrains the top K configurations and
the baseline with S fresh seeds each (OUT/confirm), picks the winner on mean validation,
evaluates each confirmed run once on test, and gives the winner's margins with 95 %
intervals (OUT/summary.json's confirmation, OUT/confirmation.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cifarray.config import check_batch_split, flag_of
from cifarray.data.source import DataSource, Procedural
from cifarray.errors import UserError, run_cli
from cifarray.tune import results
from cifarray.tune.layout import ARGS_FILE, EXPERIMENT, STUDY_DB, SWEEP_CLUSTER, SWEEP_COPY
from cifarray.rundir import SUMMARY, read_json_or_none
from cifarray.tune.sweep import TRIAL_RUNNERS, Confirm, Sweep, default_sweep, load, parse_confirm
from cifarray.tune.planning import Live, Plan, plan_on_cluster, trial_workers
from cifarray.tune.runners import RUNNERS, TrialRunner, trial_runner
from hpc.unpickle import writable_by_others

KEEP = 3  # Tune checkpoints kept per running trial (see `tuner`)
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
    p.add_argument("--confirm", metavar="K:S", help="after the search, retrain its top K configurations (by validation) "
                   "and its baseline with S fresh seeds each, pick the winner on mean validation and give its margins "
                   "with 95%% intervals (off: skip it); default: the sweep file's confirm, else off. On a finished "
                   "sweep's --out it confirms that sweep")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over --out's lock although its holder, on another host, may still run")
    return p


@dataclass(frozen=True)
class TuneArgs:
    """The tuner's settings, resolved once from the command line (and, on --resume, from OUT) and checked
    before Ray starts. Everything after reads them; nothing changes them."""

    out: Path
    sweep: Sweep
    resume: bool
    data: Path  # the data folder: --data-dir, or OUT/data for procedural data (written by `write_experiment`)
    data_dir: str | None
    synthetic: bool
    no_verify: bool
    address: str | None
    gpus_per_trial: float  # 0 with `auto_gpus` until the Ray cluster is joined (`launch`)
    auto_gpus: bool
    workers_per_trial: int | None
    workers: int  # DDP workers per trial, resolved
    cpus_per_trial: int | None
    max_concurrent: int | None
    trials: int | None  # as given (None: the sweep file's)
    trial_runner: str  # resolved: tune | train
    confirm: Confirm | None = None  # --confirm, else the running confirmation's, else the sweep file's
    search_done: bool = False  # OUT's search has ended and been summarised (a confirmation may follow)
    stored_study: bool = True  # the study is in OUT (False: an experiment from before it was stored)
    study: str = STUDY_DB  # its file in OUT: optuna.journal (optuna.db: a sweep begun before the journal)

    @property
    def n_trials(self) -> int:
        return self.trials or self.sweep.trials

    @property
    def runner(self) -> TrialRunner:
        return RUNNERS[self.trial_runner]

    def saved(self, gpus_per_trial: float) -> dict:
        """tune_args.json: what --resume reads back (the GPUs per trial as `auto` resolved them)."""
        return {**{k: getattr(self, k) for k in RESUME_KEYS}, "gpus_per_trial": gpus_per_trial,
                "sweep": str(Path(self.sweep.source).resolve()), "study": self.study}


def main(argv: list[str] | None = None) -> int:
    from cifarray.runlock import RunLock

    ns = parser().parse_args(argv)
    out = Path(ns.out or f"runs/tune-{Path(ns.sweep or default_sweep()).stem}").expanduser().resolve()
    # One sweep per folder at a time; everything below reads or writes OUT, so it runs under the lock.
    with RunLock(out, "python -m cifarray.tune", force=ns.force_unlock):
        return launch(resolve_args(ns, out))


def resolve_args(ns, out: Path) -> TuneArgs:
    """The command line (and OUT, on --resume) as checked `TuneArgs`: every refusal before Ray starts."""
    confirm = parse_confirm(ns.confirm, "--confirm")
    saved = read_json_or_none(out / ARGS_FILE)
    experiment = out / EXPERIMENT
    resume = ns.resume == "yes" or (ns.resume == "auto" and saved is not None and experiment.exists())
    search_done = saved is not None and (read_json_or_none(out / SUMMARY) or {}).get("status") == "complete"
    if ns.confirm and experiment.exists() and not resume:
        if not search_done:
            raise UserError(f"--confirm: the search in {out} has not finished; pass --resume with --confirm to finish "
                            "it and then confirm it")
        resume = True  # a finished search, confirmed now: its own settings come back as on --resume
    values = {k: getattr(ns, k) for k in RESUME_KEYS} | {"address": ns.address}
    auto_gpus = values["gpus_per_trial"] == "auto"  # decided once the Ray cluster is joined
    try:
        values["gpus_per_trial"] = 0.0 if auto_gpus else float(values["gpus_per_trial"])
    except ValueError:
        raise UserError(f"--gpus-per-trial must be a number or auto, got {values['gpus_per_trial']!r}") from None
    if resume:
        sweep = _resumed(ns, out, saved, values)
    else:
        sweep = load(ns.sweep or default_sweep())
        if experiment.exists():
            raise UserError(f"{out} already holds an experiment; pass --resume to continue it, or another --out")
    if not values["synthetic"] and not values["data_dir"]:
        raise UserError("no data given: pass --data-dir DIR (real CIFAR-100) or --synthetic (procedural data)")
    for name in ("max_concurrent", "workers_per_trial", "cpus_per_trial", "trials"):
        if values[name] is not None and values[name] < 1:
            raise UserError(f"{flag_of(name)} must be at least 1, got {values[name]}")
    workers = trial_workers(values["gpus_per_trial"], values["workers_per_trial"])
    values["trial_runner"] = trial_runner(values["trial_runner"] or sweep.trial_runner, workers).name
    _check_batches(sweep, workers)
    data = out / "data" if values["synthetic"] else Path(values["data_dir"]).expanduser().resolve()
    confirm = _confirmation(out, sweep, confirm, given=ns.confirm is not None)
    args = TuneArgs(out=out, sweep=sweep, resume=resume, data=data, auto_gpus=auto_gpus, workers=workers,
                    confirm=confirm, search_done=resume and search_done,
                    stored_study=not resume or bool(saved.get("study")),
                    study=(saved.get("study") or STUDY_DB) if resume else STUDY_DB, **values)
    _check_cluster_named(args)
    _check_data(args)  # before Ray: missing, corrupt or too small data fails here
    return args


def _resumed(ns, out: Path, saved: dict | None, values: dict) -> Sweep:
    """--resume: the experiment's sweep, and its own settings read back into `values` unless given again."""
    if saved is None or not (out / EXPERIMENT).exists():
        raise UserError(f"--resume: {out} holds no experiment to resume; run without --resume to start one")
    if ns.sweep and Path(ns.sweep).resolve() != (out / SWEEP_COPY).resolve():
        if _canon(load(ns.sweep)) != _canon(load(out / SWEEP_COPY)):
            raise UserError(f"--resume: {ns.sweep} differs from the sweep of {out} ({out / SWEEP_COPY}); "
                            "drop --sweep to resume, or pass another --out")
    exposed = writable_by_others(out, below=out / EXPERIMENT)  # Tune's state and the searcher's are pickles
    if exposed:
        raise UserError(f"--resume: {exposed[0]} could have been written by another user ({exposed[1]}), and "
                        f"resuming unpickles what {out / EXPERIMENT} holds (it could run their code); if you trust "
                        f"it, make it yours alone (chmod -R go-w {out}), or start a new sweep in another --out")
    sweep = load(out / SWEEP_COPY)
    if saved.get("study") and not (out / saved["study"]).is_file():
        raise UserError(f"--resume: {out / saved['study']}, the sweep's Optuna study, is missing; put it back (a "
                        "backup, or the folder it was moved from), or start a new sweep in another --out")
    if values["trials"] is not None and values["trials"] != (saved.get("trials") or sweep.trials):
        raise UserError("--trials cannot change when resuming: the experiment keeps its own count")
    # Experiments from before --trial-runner existed ran every trial through a TorchTrainer.
    was = saved.get("trial_runner") or "train"
    if values["trial_runner"] is not None and values["trial_runner"] != was:
        raise UserError(f"--trial-runner cannot change when resuming: {out} runs its trials with {was} "
                        "(unfinished trials continue from that runner's checkpoints); drop --trial-runner")
    values["trial_runner"] = was
    for key in RESUME_KEYS:  # the experiment's own settings, unless given again
        if values[key] in (None, False, 0) and saved.get(key) not in (None, False):
            values[key] = saved[key]
    return sweep


def _confirmation(out: Path, sweep: Sweep, asked: Confirm | None, given: bool) -> Confirm | None:
    """What confirms the sweep: --confirm, else the one OUT has begun (its plan), else the sweep file's. A begun
    confirmation keeps its K:S: its configurations and seeds are chosen."""
    from cifarray.tune.confirm import PLAN, folder

    begun = read_json_or_none(folder(out) / PLAN)
    if begun is None:
        return asked if given else sweep.confirm
    if given and asked is not None and str(asked) != begun["confirm"]:
        raise UserError(f"--confirm {asked}: {out} is being confirmed with {begun['confirm']}; drop --confirm (or "
                        f"pass {begun['confirm']}) to go on with it, or move {folder(out)} away to confirm anew")
    return None if given and asked is None else parse_confirm(begun["confirm"], str(folder(out) / PLAN))


def _check_batches(sweep: Sweep, workers: int) -> None:
    batches = [sweep.base.batch_size]
    if "batch_size" in sweep.space and sweep.space["batch_size"].kind == "choice":
        batches = list(sweep.space["batch_size"].values)
    for b in batches:
        check_batch_split(b, workers, f"batch size {b} is not divisible by {workers} workers per trial",
                          "change the sweep's batch sizes or --workers-per-trial")


def _check_cluster_named(args: TuneArgs) -> None:
    """A named Ray cluster must answer, and GPU trials need GPUs where no cluster is named (before OUT is written)."""
    from cifarray.train.cluster import check_local_gpus, check_reachable

    if args.address or os.environ.get("RAY_ADDRESS"):
        check_reachable(args.address or os.environ["RAY_ADDRESS"])
    check_local_gpus(args.gpus_per_trial, args.address, f"--gpus-per-trial {args.gpus_per_trial:g}",
                     "pass --gpus-per-trial 0 (or auto), or --address of a Ray cluster with GPUs")


def write_experiment(args: TuneArgs, gpus_per_trial: float) -> None:
    """What the experiment is made of (procedural data, sweep.toml, tune_args.json), written once the Ray cluster
    is known to hold its trials: a sweep refused for resources leaves OUT as it found it."""
    sweep = args.sweep
    if not (args.data / "cifar-100-python" / "meta").exists():
        data_source(args).write()  # procedural data only
    if not args.resume:
        shutil.copyfile(sweep.source, args.out / SWEEP_COPY)
        (args.out / ARGS_FILE).write_text(json.dumps(args.saved(gpus_per_trial), indent=2))


def _canon(sweep: Sweep) -> str:
    return repr((sweep.model, sweep.trials, sweep.seed, sorted(sweep.train.items()), sorted(sweep.space.items()),
                 sweep.grace_period, sweep.reduction_factor))


def _largest(sweep: Sweep, key: str) -> int:
    """The largest value of an integer setting that a trial can sample (or the fixed one)."""
    p = sweep.space.get(key)
    if p is None:
        return getattr(sweep.base, key)
    return max(p.values) if p.kind == "choice" else p.values[1]


def data_source(args: TuneArgs, val_size: int | None = None) -> DataSource:
    """The sweep's data: --data-dir, or procedural data in OUT/data (written once, by the sweep's seed), which every
    trial reads as its data folder."""
    base = args.sweep.base
    procedural = (Procedural(train_per_class=base.synthetic_train_per_class,
                             test_per_class=base.synthetic_test_per_class, seed=args.sweep.seed,
                             difficulty=base.synthetic_difficulty) if args.synthetic else None)
    return DataSource(args.data, procedural, verify=not (args.synthetic or args.no_verify),
                      val_size=base.val_size if val_size is None else val_size, seed=base.seed)


def _check_data(args: TuneArgs) -> None:
    """Check the data, and that every trial config the sweep can sample fits it (procedural data: its size)."""
    sweep = args.sweep
    data_source(args, val_size=_largest(sweep, "val_size")).check_fits(
        _largest(sweep, "batch_size"), args.workers,
        flag=lambda key: f"the sweep's {'largest ' if key in sweep.space else ''}{key}")


def launch(args: TuneArgs) -> int:
    """Plan on the cluster, write the experiment, run it (or resume it), and summarise it."""
    if reported_again(args):
        return 0
    # Tune's experiment snapshot holds every trial, so its cost grows with the sweep: Tune's own adaptive period (10 s
    # or more, at most ~5 % of the driver's time) keeps that cost per trial flat, where a fixed 2 s did not (a
    # 1,000-trial profile, docs/BENCHMARKS.md). A SIGKILLed sweep loses that much bookkeeping, no training: a trial
    # that finished after the snapshot reports from its run folder on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "auto")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    import optuna

    sweep = args.sweep
    context = sweep.family.driver_context(sweep.base)  # e.g. the DCGAN's Inception weights, resolved once
    goal = sweep.family.sweep.objective(context)
    placed = plan_on_cluster(args)
    # A drained trial reports its checkpoint without the objective (nothing was evaluated at that step); Tune's
    # strict check would end the sweep on it. The searcher and ASHA skip such results.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    write_experiment(args, placed.gpus_per_trial)
    f = placed.gpus_per_trial
    per_worker = (f"{f / args.workers:g} GPU" + (f" ({int(1 / f + 1e-9)} trials per GPU)" if f < 1 else "") if f
                  else f"{placed.cpus_per_worker} CPU")
    print(f"sweep {Path(sweep.source).name}: {sweep.model}, {args.n_trials} trials, objective {goal.label} "
          f"({goal.mode}), budget {sweep.budget:,} params; ASHA grace {sweep.grace_period} steps, reduction "
          f"x{sweep.reduction_factor}, max {sweep.steps} steps; {placed.concurrent} trial(s) at once, "
          f"{args.workers} worker(s) x {per_worker} each; trials "
          f"{args.runner.how}; "
          f"out {args.out}", flush=True)
    started = time.time()
    with publish_cluster(args.out):
        if args.search_done and args.confirm:  # the search has ended; what is left is its confirmation
            summary = read_json_or_none(args.out / SUMMARY)
            print(f"the search in {args.out} has ended ({args.out / SUMMARY}); confirming it", flush=True)
        else:
            confirmed = (read_json_or_none(args.out / SUMMARY) or {}).get("confirmation")
            tuner(args, placed, context, goal).fit()
            summary = results.conclude(args.out, sweep, goal.metric, goal.mode, goal.label, data_dir=args.data,
                                       synthetic=args.synthetic, seconds=time.time() - started,
                                       requested=args.n_trials, test_best=args.confirm is None, context=context)
            if confirmed and args.confirm is None:  # --confirm off on a confirmed sweep: its confirmation stays
                summary["confirmation"] = confirmed
                results.write_summary(args.out, summary)
        results.print_summary(summary)
        if summary["status"] == "interrupted":
            return 130  # Ctrl-C: Tune stops the sweep and returns
        if args.confirm is None:
            return 0
        summary = confirm_sweep(args, placed, context, goal, summary)
    return 130 if summary["confirmation"]["status"] == "interrupted" else 0


def confirm_sweep(args: TuneArgs, placed: Plan, context, goal, summary: dict) -> dict:
    """The confirmation's Tune experiment (OUT/confirm), new or resumed, then its results in summary.json."""
    from ray import tune

    from cifarray.tune import confirm
    from cifarray.tune.console import SweepConsole

    out, sweep = args.out, args.sweep
    plan = confirm.plan_for(out, sweep, goal.metric, goal.mode, args.confirm)
    where, runs = confirm.folder(out), confirm.points(plan)
    print(f"confirming {len(plan['configs'])} configuration(s) ({', '.join(c['name'] for c in plan['configs'])}) with "
          f"{args.confirm.seeds} fresh seeds each: {len(runs)} runs of {sweep.steps} steps in {where}", flush=True)
    trainable = _trainable(args, placed, context, goal, where)
    experiment = confirm.experiment_path(out)
    if tune.Tuner.can_restore(str(experiment)):
        run = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        console = SweepConsole(str(where), sweep, goal.metric, goal.mode, goal.label, len(runs),
                               concurrent=placed.concurrent)
        run_config = tune.RunConfig(name=EXPERIMENT, storage_path=str(where), verbose=0, callbacks=[console],
                                    failure_config=tune.FailureConfig(max_failures=1),
                                    checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP))
        # Every run to its last step (no scheduler stops one), in the plan's order, as many at once as fit.
        run = tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
            search_alg=confirm.fixed_configs(runs), num_samples=len(runs), reuse_actors=args.runner.reuse_actors,
            max_concurrent_trials=args.max_concurrent))
    run.fit()
    result = confirm.conclude(out, sweep, context, plan, results.load_trials(where), goal.label)
    summary = {**summary, "confirmation": result}
    if result["status"] == "complete":
        summary["selection"] = ("validation split only: the search's top configurations and baseline retrained with "
                                "fresh seeds, the winner by mean validation; the test split is evaluated once per "
                                "confirmed run, after all have trained")
        summary["figures"] = [*(f for f in summary.get("figures", []) if f != result["figure"]), result["figure"]]
    results.write_summary(out, summary)
    confirm.print_confirmation(result)
    return summary


def reported_again(args: TuneArgs) -> bool:
    """A sweep whose search and confirmation have both ended: its last lines again, without a Ray cluster."""
    if not (args.search_done and args.confirm):
        return False
    summary = read_json_or_none(args.out / SUMMARY)
    done = summary.get("confirmation") or {}
    if done.get("status") != "complete" or done.get("confirm") != str(args.confirm):
        return False
    from cifarray.tune.confirm import print_confirmation

    results.print_summary(summary)
    print_confirmation(done)
    return True


@contextlib.contextmanager
def publish_cluster(out: Path):
    """OUT/ray-cluster.json while the sweep runs on an hpc.ray_cluster job: what `python -m hpc.join OUT` joins (the
    cluster's address and its token file's path, never the token). `state` ends as `ended` once the sweep has
    finished, `stopped` if it was stopped first (a requeue: join jobs leave, and are submitted again)."""
    from cifarray.rundir import RunDir

    run = RunDir(out)
    if not (os.environ.get("HPC_JOB_DIR") and os.environ.get("RAY_AUTH_TOKEN_PATH") and os.environ.get("RAY_ADDRESS")):
        yield
        return
    info = {"address": os.environ["RAY_ADDRESS"], "token_file": os.environ["RAY_AUTH_TOKEN_PATH"],
            "dashboard": os.environ.get("HPC_DASHBOARD"), "job_dir": os.environ["HPC_JOB_DIR"], "pid": os.getpid(),
            "state": "running", "started": time.time()}
    run.write_json(SWEEP_CLUSTER, info)
    finished = False
    try:
        yield
        finished = True
    finally:
        run.write_json(SWEEP_CLUSTER, {**info, "state": "ended" if finished else "stopped", "stopped": time.time()})


def _trainable(args: TuneArgs, placed: Plan, context, goal, out: Path):
    """Tune's trainable: a trial (or confirmation run) that trains in out/trials/<trial id>."""
    from ray import tune

    from cifarray.tune.trial import run_trial

    sweep, runner = args.sweep, args.runner
    base = {**sweep.train, "data_dir": str(args.data), "synthetic": False,
            "no_verify": True if args.synthetic else args.no_verify, "workers": args.workers,
            "gpu": bool(placed.gpus_per_trial), "cpus_per_worker": placed.cpus_per_worker,
            "checkpoint_every": sweep.eval_every}  # every report carries a checkpoint and the objective
    trainable = tune.with_parameters(run_trial, sweep=sweep, base=base, out=str(out), objective=goal,
                                     context=context, runner=runner,
                                     gpus_per_worker=placed.gpus_per_trial / args.workers)
    return tune.with_resources(trainable, runner.resources(placed.cpus_per_worker, placed.gpus_per_trial))


def tuner(args: TuneArgs, placed: Plan, context, goal):
    """The Tune experiment: restored from OUT on --resume, else new (Optuna TPE + ResumableASHA)."""
    from ray import tune
    import optuna

    from cifarray.tune.asha import ResumableASHA
    from cifarray.tune.console import SweepConsole
    from cifarray.tune.searcher import AllocationLimiter, StoredOptunaSearch, bind
    from cifarray.tune.trial import SpaceSampler

    sweep, out, runner = args.sweep, args.out, args.runner
    trainable = _trainable(args, placed, context, goal, out)
    # What Tune's pickles of the searcher and limiter take from this process: where, the study, and the live count.
    bind(out, placed.concurrent, args.study, Live(placed, args.workers, args.max_concurrent, args.n_trials))
    if args.resume:
        # The saved RunConfig comes back with it, console callback included (see SweepConsole.__getstate__).
        at = (f"at this allocation's {placed.concurrent} trial(s) at once (then as nodes join and leave)"
              if args.stored_study else
              f"at its first run's concurrency ({out} predates its stored study: it keeps it in memory)")
        print(f"resuming {out / EXPERIMENT} {at}: finished trials are kept, unfinished ones continue from their "
              f"checkpoints with {placed.cpus_per_worker} CPU(s) per worker", flush=True)
        return tune.Tuner.restore(str(out / EXPERIMENT), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    (out / args.study).unlink(missing_ok=True)  # left by a start that never made an experiment: not this sweep's
    console = SweepConsole(str(out), sweep, goal.metric, goal.mode, goal.label, args.n_trials,
                           concurrent=placed.concurrent)
    # In-actor trials checkpoint through Tune (OUT/tune/<trial>/checkpoint_*), TorchTrainer trials through Ray Train
    # (OUT/trials/<id>/ray, the two newest). Tune keeps a trial's KEEP newest while it runs (the console removes
    # them once it has ended), and snapshots the whole experiment whenever one trial has checkpointed KEEP times
    # since the last snapshot, so that the snapshot never names a deleted checkpoint: at 2, every short trial
    # forced a snapshot of every trial, a cost per trial that grew with the sweep.
    run_config = tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0, callbacks=[console],
                                failure_config=tune.FailureConfig(max_failures=1),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP))
    sampler = optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=min(10, max(2, args.n_trials // 3)))
    first = [sweep.baseline_sampled] if sweep.baseline else None  # the [baseline], enqueued as the first trial
    search = AllocationLimiter(StoredOptunaSearch(space=SpaceSampler(sweep), metric=goal.metric, mode=goal.mode,
                                                  sampler=sampler, study_name=Path(sweep.source).stem,
                                                  points_to_evaluate=first),
                               max_concurrent=placed.concurrent)
    scheduler = ResumableASHA(out=str(out), time_attr="step", metric=goal.metric, mode=goal.mode, max_t=sweep.steps,
                              grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)
    return tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
        search_alg=search, scheduler=scheduler, num_samples=args.n_trials, reuse_actors=runner.reuse_actors))


if __name__ == "__main__":
    sys.exit(run_cli(main))
