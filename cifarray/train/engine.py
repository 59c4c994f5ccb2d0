"""The training engine: one per-worker loop for every model family, and what a family is.

A family (DenseNet, DCGAN, or one registered from outside, see `cifarray.registry`) supplies
pieces; this module owns everything around them, once:

- `build(cfg, worker) -> state`: models, optimizers, schedules, augmentation. `state.stateful`
  names the components a checkpoint holds (the engine adds the data order).
- `step(state, batch) -> {name: tensor}`: one optimisation step on `batch` (this rank's indices into
  `worker.data.train`, on the device). Pure tensor work: no `.item()`, no branching on values, so
  that it can be compiled or captured as a whole. The engine sums the tensors on the device and
  reads them back only at log points (mean over steps and ranks).
- `evaluate(state, step) -> {name: float}`: rank 0, at the family's evaluation steps.
- `finish(state, run) -> {summary fields}`: rank 0, after the last step: final weights and the
  family's part of summary.json.

The engine does the run's set-up, restore and snapshot, the cadence (log, NaN check, evaluation,
checkpoint, report; final files before the final report), reseeding `worker.gen` at checkpoints,
worker info, provenance and the common summary fields. `Worker` and `RunContext` are what the pieces get.
Who runs it (a Ray Train worker, a Tune trial's own actor, or this process) is the `Session` it is given
(`cifarray.train.session`): rank, world, device, data, reports and the checkpoint to resume from.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from cifarray.data.loader import PreparedData, ShardedBatches
from cifarray.rundir import MetricsLog, RunDir, read_metrics
from cifarray.train import common
from cifarray.train.session import LocalSession, Session


@dataclass(frozen=True)
class RunContext:
    """What the driver hands a worker that is not configuration (config.json does not record it)."""

    sweep_trial: bool = False  # a Tune trial: selects on validation data; the test split stays unseen
    fid_weights: tuple[str, str] | None = None  # (safe Inception weights path, sha256), resolved by the driver


@dataclass
class Worker:
    """One worker's view of the run: given to `build`, and kept by the state the family returns."""

    cfg: Any
    run: RunDir
    device: torch.device
    rank: int
    world: int
    precision: str  # resolved: bf16 or fp32
    data: PreparedData
    gen: torch.Generator  # a family's random draws (DCGAN: flips, noise); the engine reseeds it at checkpoints
    context: RunContext
    sampler: ShardedBatches  # this rank's batch order: `step` gets the batch its next() returned
    session: Session  # who runs the loop (DDP, reports, resume)
    attempt: int = 0
    start: int = 0  # the step training resumes after (0: a fresh run); set after restore

    @classmethod
    def local(cls, cfg: Any, data: PreparedData, run_dir: str | Path, device: torch.device, precision: str,
              context: RunContext = RunContext(sweep_trial=True)) -> "Worker":
        """A worker in this process with no Ray and no loop around it: for benches and tests that build a
        family's state and call its pieces directly (seeded: gen 0)."""
        return cls(cfg=cfg, run=RunDir(run_dir), device=device, rank=0, world=1, precision=precision, data=data,
                   gen=torch.Generator(device=device).manual_seed(0), context=context,
                   sampler=ShardedBatches(len(data.train), cfg.batch_size, device=device),
                   session=LocalSession(run_dir, device))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train with: DDP when world > 1, then torch.compile when asked."""
        model = self.session.prepare_model(model)
        return torch.compile(model) if self.cfg.compile else model

    def autocast(self, cache: bool = True):
        return common.autocast(self.device, self.precision, cache)


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # max | min
    label: str

    @property
    def worst(self) -> float:
        """What a trial that has no score scores (infeasible, diverged): a sweep must still hear the metric."""
        return worst(self.mode)


def worst(mode: str) -> float:
    return 0.0 if mode == "max" else 1e9


def _nothing(*args: Any) -> dict:
    return {}


def _no_context(cfg: Any) -> RunContext:
    return RunContext()


@dataclass(frozen=True)
class Family:
    """Everything the CLI, the tuner, the report and the engine need to know about one model family."""

    name: str
    config: type  # the training config dataclass (a `CommonConfig`)
    build: Callable[[Any, Worker], Any]
    step: Callable[[Any, torch.Tensor], dict[str, torch.Tensor]]
    evaluate: Callable[[Any, int], dict[str, float]]
    finish: Callable[[Any, RunDir], dict[str, Any]]
    metric_fields: tuple[str, ...]  # metrics.csv columns between step and images_per_s
    objective: Callable[[RunContext], Objective]  # what a sweep selects on
    param_count: Callable[[Any], int]  # trainable parameters of the config's model(s)
    enforce_budget: Callable[[Any], int]  # the count, or BudgetError naming the flags to change
    report: Callable[[RunDir, Any], list[Path]]  # figures and tables of a finished run
    progress_keys: tuple[str, ...] = ()  # shown while training
    summary_keys: tuple[str, ...] = ()  # printed by the CLI when training ends
    description: str = ""
    # Optional pieces. Module-level functions, not lambdas: Optuna's searcher state pickles the family.
    log_fields: Callable[[Any], dict[str, Any]] = _nothing  # host values added to every metrics row
    eval_now: Callable[[Any, int], bool] | None = None  # default: every cfg.eval_every steps
    begin: Callable[[Any], None] = _nothing  # rank 0, after restore, before the first step
    driver_context: Callable[[Any], RunContext] = _no_context  # driver side, before Ray starts
    test_metrics: Callable[[RunDir, Any], dict[str, Any]] = _nothing  # a sweep's best trial, once
    sweep: Any = None  # SweepRules: special sweep keys, their expansion, console columns (cifarray.tune.sweep)

    @property
    def metrics_columns(self) -> list[str]:
        """metrics.csv's header."""
        return ["step", *self.metric_fields, "images_per_s", "seconds", "attempt"]

    def train_fn(self, context: RunContext) -> Callable[[dict], None]:
        """The Ray Train per-worker function of this family (a `TorchTrainer`'s train_loop_per_worker)."""
        return _TrainLoop(self, context)

    def evaluates_at(self, state: Any, step: int) -> bool:
        return self.eval_now(state, step) if self.eval_now else step % state.worker.cfg.eval_every == 0


class _TrainLoop:
    """Picklable per-worker function (Ray Train calls it with the config dict)."""

    def __init__(self, family: Family, context: RunContext):
        self.family, self.context = family, context

    def __call__(self, config: dict) -> None:
        from cifarray.train.session import RayTrainSession

        train(self.family, config, RayTrainSession(), self.context)


def train(family: Family, config: dict, session: Session, context: RunContext = RunContext()) -> None:
    """The one training loop, whoever runs it: a Ray Train worker (1 CPU process or N GPU ranks alike), a Tune
    trial's actor, or this process (`session`)."""
    from cifarray.config import from_dict

    entered = time.perf_counter()
    cfg = from_dict(family.config, config)
    run = RunDir(cfg.out)
    device, rank, world = session.device, session.rank, session.world
    common.reset_global_state(cfg)
    data = session.data(cfg)
    sampler = ShardedBatches(len(data.train), cfg.batch_size, rank=rank, world=world, seed=cfg.seed, device=device)
    worker = Worker(cfg=cfg, run=run, device=device, rank=rank, world=world,
                    precision=common.resolve_precision(cfg.precision, device), data=data,
                    gen=torch.Generator(device=device), context=context, sampler=sampler, session=session,
                    attempt=common.next_attempt(run) if rank == 0 else 0)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank, whatever loading the data drew
    state = family.build(cfg, worker)
    stateful = {**state.stateful, "sampler": sampler}
    start = worker.start = common.restore(stateful, session)
    worker.gen.manual_seed(common.augment_seed(cfg.seed, rank, start))
    log = MetricsLog(run.metrics, family.metrics_columns)
    if rank == 0:
        log.truncate_after(start)
        family.begin(state)
    common.write_worker_info(run, rank, pid=os.getpid(), host=socket.gethostname(), start_step=start,
                             attempt=worker.attempt, runner=session.name, slurm_node=os.environ.get("SLURMD_NODENAME"),
                             data_cached=bool(getattr(session, "data_cached", False)))

    keys: list[str] = []
    sums = torch.zeros(0, device=device)
    started = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    row: dict[str, Any] = {}
    checkpoint = None
    for step in range(start + 1, cfg.steps + 1):
        metrics = family.step(state, sampler.next())
        if not keys:
            keys, sums = list(metrics), torch.zeros(len(metrics), dtype=torch.float64, device=device)
        sums += torch.stack([metrics[k].detach().to(torch.float64) for k in keys])
        window_steps += 1

        is_last = step == cfg.steps
        ckpt_now = step % cfg.checkpoint_every == 0 or is_last
        eval_now = family.evaluates_at(state, step) or is_last
        if not (step % cfg.log_every == 0 or ckpt_now or eval_now):
            continue
        # The one host sync of a window, and one collective: sums over ranks.
        totals = common.all_reduce_sum(sums.tolist(), device)
        elapsed = time.perf_counter() - window_start
        means = {k: v / (window_steps * world) for k, v in zip(keys, totals)}
        bad = [v for v in means.values() if not math.isfinite(v)]
        if bad:
            # The objective at its worst: a sweep's scheduler and searcher need it in every result.
            goal = family.objective(context)
            common.stop_diverged(session, run, step, bad[0], rank, {goal.metric: goal.worst})
            return
        row = {"step": step, **means, **family.log_fields(state),
               "images_per_s": window_steps * cfg.batch_size / max(elapsed, 1e-9), "seconds": elapsed,
               "attempt": worker.attempt}
        if rank == 0:
            if eval_now:
                row.update(family.evaluate(state, step))
            log.append(row)
        checkpoint = None
        if ckpt_now:
            checkpoint = common.snapshot(stateful, step)
            worker.gen.manual_seed(common.augment_seed(cfg.seed, rank, step))
        if is_last:
            break  # the final report comes after the final files (below)
        if ckpt_now or eval_now:  # a report is a round trip to the controller
            common.report(session, run, row, checkpoint, rank)
        sums.zero_()
        window_steps, window_start = 0, time.perf_counter()

    trained = time.perf_counter()
    primary = next(c for c in state.stateful.values() if isinstance(c, torch.nn.Module))
    common.write_worker_info(run, rank, params_sha256=common.params_sha256(primary), final_step=cfg.steps)
    if rank == 0:
        seconds = sum(float(r["seconds"]) for r in read_metrics(run.metrics))
        fields = family.finish(state, run)
        run.write_json("summary.json", {
            "model": family.name, "status": "complete", "steps": cfg.steps, "workers": world,
            "batch_size": cfg.batch_size, "seconds": round(seconds, 2),
            "images_per_s": round(cfg.steps * cfg.batch_size / max(seconds, 1e-9), 1),
            # This attempt's wall clock in the worker: data, build and restore; the loop (evaluations and
            # checkpoints included); final evaluation and files. Ray's own start-up is the driver's.
            "startup_s": round(started - entered, 2), "train_s": round(trained - started, 2),
            "finish_s": round(time.perf_counter() - trained, 2),
            "seed": cfg.seed, "precision": worker.precision, "runner": session.name, "finished_at": time.time(),
            **fields, **common.provenance(device),
        })
    if start < cfg.steps:
        # Last, so that whoever acts on the final result (Tune's scheduler may end the trial on it) finds
        # the final weights and summary.json already written.
        common.report(session, run, row, checkpoint, rank)

