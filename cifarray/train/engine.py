"""The training engine: one per-worker loop for every model family (`cifarray.family` says what a family is).

A family supplies pieces (build, step, evaluate, finish); this module owns everything around them, once:
the run's set-up, restore and snapshot, the cadence (log, NaN check, evaluation, checkpoint, report; final
files before the final report), reseeding `worker.gen` at checkpoints, worker info, provenance and the
common summary fields. `Worker` is what the pieces get. Who runs the loop (a Ray Train worker, a Tune
trial's own actor, or this process) is the `Session` it is given (`cifarray.train.session`): rank, world,
device, data, reports and the checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cifarray.data.loader import PreparedData, ShardedBatches
from cifarray.device import autocast, resolve_precision
from cifarray.family import Family, Pieces, RunContext, TrainState
from cifarray.phases import enabled as timed, mark
from cifarray.provenance import provenance
from cifarray.rundir import MetricsLog, RunDir, read_metrics
from cifarray.train.checkpoint import restore, send_result, snapshot
from cifarray.train.runfolder import RAY_RUN_NAME
from cifarray.train.session import LocalSession, Session
from cifarray.train.workerlog import label, worker_log


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
    # This attempt's seconds inside the loop spent in validation evaluations and in checkpoints (state, save,
    # report): summary.json's eval_s and checkpoint_s, the loop's train_s less its steps' seconds.
    spent: dict[str, float] = field(default_factory=lambda: {"eval_s": 0.0, "checkpoint_s": 0.0})

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
        return autocast(self.device, self.precision, cache)


class TrainLoop:
    """Picklable per-worker function of a family (Ray Train calls it with the config dict)."""

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
    mark("worker_entered", rank=session.rank)
    cfg = from_dict(family.config, config)
    # A sweep trial's folder is OUT/trials/<trial id>: its lines in the job log are headed with that id.
    voice = (worker_log(label(Path(cfg.out).name if context.sweep_trial else None, session.rank))
             if session.in_ray else contextlib.nullcontext())
    with voice:
        _train(family, cfg, session, context, entered)


def _train(family: Family, cfg: Any, session: Session, context: RunContext, entered: float) -> None:
    worker, state, stateful = _set_up(family.pieces, cfg, session, context)
    mark("set_up", rank=worker.rank)
    started = time.perf_counter()
    last = _loop(family.pieces, worker, state, stateful)
    if last is None:
        return  # diverged: reported
    trained = time.perf_counter()
    mark("trained", rank=worker.rank)
    write_worker_info(worker.run, worker.rank, params_sha256=params_sha256(state.primary), final_step=cfg.steps)
    if worker.rank == 0:
        _write_summary(family, worker, state, {"startup_s": started - entered, "train_s": trained - started,
                                               "trained": trained})
        mark("finished", rank=worker.rank)
    if worker.start < cfg.steps:
        # Last, so that whoever acts on the final result (Tune's scheduler may end the trial on it) finds
        # the final weights and summary.json already written.
        send_result(session, worker.run, *last, worker.rank)


def _set_up(pieces: Pieces, cfg: Any, session: Session, context: RunContext) -> tuple[Worker, TrainState, dict]:
    """The worker, the family's state restored from the newest loadable checkpoint, and what a checkpoint holds."""
    run = RunDir(cfg.out)
    device, rank, world = session.device, session.rank, session.world
    reset_global_state(cfg)
    if device.type == "cuda" and timed():  # the CUDA context, apart from the data it is otherwise created for
        mark("cuda_init", rank=rank)
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
        mark("cuda_ready", rank=rank)
    data = session.data(cfg)
    sampler = ShardedBatches(len(data.train), cfg.batch_size, rank=rank, world=world, seed=cfg.seed, device=device)
    worker = Worker(cfg=cfg, run=run, device=device, rank=rank, world=world,
                    precision=resolve_precision(cfg.precision, device), data=data,
                    gen=torch.Generator(device=device), context=context, sampler=sampler, session=session,
                    attempt=run.next_attempt() if rank == 0 else 0)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank, whatever loading the data drew
    state = pieces.build(cfg, worker)
    stateful = {**state.stateful, "sampler": sampler}
    start = worker.start = restore(stateful, session, also=run.path / RAY_RUN_NAME)
    worker.gen.manual_seed(augment_seed(cfg.seed, rank, start))
    if rank == 0:
        MetricsLog(run.metrics, pieces.metrics_columns).truncate_after(start)
        pieces.begin(state)
    write_worker_info(run, rank, pid=os.getpid(), host=socket.gethostname(), start_step=start,
                      attempt=worker.attempt, runner=session.name, slurm_node=os.environ.get("SLURMD_NODENAME"),
                      data_cached=bool(getattr(session, "data_cached", False)))
    return worker, state, stateful


class _Window:
    """The step metrics since the last log point, summed on the device (read back only at log points)."""

    def __init__(self, device: torch.device):
        self.device, self.keys, self.sums = device, [], torch.zeros(0, device=device)
        self.restart()

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        if not self.keys:
            self.keys = list(metrics)
            self.sums = torch.zeros(len(metrics), dtype=torch.float64, device=self.device)
        self.sums += torch.stack([metrics[k].detach().to(torch.float64) for k in self.keys])
        self.steps += 1

    def means(self, world: int) -> dict[str, float]:
        # The one host sync of a window, and one collective: sums over ranks.
        totals = all_reduce_sum(self.sums.tolist(), self.device)
        return {k: v / (self.steps * world) for k, v in zip(self.keys, totals)}

    def restart(self) -> None:
        self.sums.zero_()
        self.steps, self.started = 0, time.perf_counter()


def _loop(pieces: Pieces, worker: Worker, state: TrainState, stateful: dict) -> tuple[dict, dict | None] | None:
    """Steps start+1..cfg.steps; returns the last row and checkpoint (reported by the caller after the final
    files), or None when the loss diverged (reported here)."""
    cfg, run, rank, session = worker.cfg, worker.run, worker.rank, worker.session
    log = MetricsLog(run.metrics, pieces.metrics_columns)
    window = _Window(worker.device)
    row: dict[str, Any] = {}
    checkpoint = None
    single = worker.world == 1
    for step in range(worker.start + 1, cfg.steps + 1):
        window.add(pieces.step(state, worker.sampler.next()))
        if step == worker.start + 1:
            first_step_done(worker)
        is_last = step == cfg.steps
        # A draining node (cifarray.train.drain): one worker checks a flag every step; DDP ranks agree at log
        # points (one more all-reduce there), so that every rank checkpoints at the same step.
        drain = single and session.draining()
        ckpt_now = step % cfg.checkpoint_every == 0 or is_last or drain
        eval_now = pieces.evaluates_at(state, step) or is_last
        log_now = step % cfg.log_every == 0
        if not (log_now or ckpt_now or eval_now):
            continue
        if not single and not is_last and all_reduce_sum([float(session.draining())], worker.device)[0] > 0:
            drain = ckpt_now = True
        means = window.means(worker.world)
        # After the means' host sync: on a GPU the window's queued steps have run by now, so `seconds` holds
        # their work, not only their launches (the rest would be counted in the next evaluation's time).
        elapsed = time.perf_counter() - window.started
        bad = [v for v in means.values() if not math.isfinite(v)]
        if bad:
            goal = worker.context.objective  # a sweep's scheduler and searcher need it in every result
            stop_diverged(session, run, step, bad[0], rank, {goal.metric: goal.worst} if goal else {})
            return None
        row = {"step": step, **means, **pieces.log_fields(state),
               "images_per_s": window.steps * cfg.batch_size / max(elapsed, 1e-9), "seconds": elapsed,
               "attempt": worker.attempt}
        if rank == 0:
            if eval_now:
                with _timed(worker, "eval_s"):
                    row.update(pieces.evaluate(state, step))
            log.append(row)
        checkpoint = None
        if ckpt_now:
            with _timed(worker, "checkpoint_s"):
                checkpoint = snapshot(stateful, step)
            worker.gen.manual_seed(augment_seed(cfg.seed, rank, step))
        if is_last:
            break  # the final report comes after the final files (train)
        if drain:
            # Saved and reported (without the objective: nothing was evaluated at this step); nothing after it is
            # trained here. `park` returns only if the drain is cancelled, and training goes on.
            send_result(session, run, {**row, "drained": 1}, checkpoint, rank)
            session.park()
        elif ckpt_now or eval_now:  # a report is a round trip to the controller
            with _timed(worker, "checkpoint_s" if checkpoint is not None else "eval_s"):
                send_result(session, run, row, checkpoint, rank)
        window.restart()
    return row, checkpoint


@contextlib.contextmanager
def _timed(worker: Worker, key: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        worker.spent[key] += time.perf_counter() - started


def first_step_done(worker: Worker) -> None:
    """The first step's mark, once its work has run (a GPU's queue drained: only when the bench asks)."""
    if timed():
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)
        mark("first_step", rank=worker.rank)


def _write_summary(family: Family, worker: Worker, state: TrainState, timing: dict[str, float]) -> None:
    """Rank 0: the family's final files and summary.json."""
    cfg, run = worker.cfg, worker.run
    seconds = sum(float(r["seconds"]) for r in read_metrics(run.metrics))
    fields = family.pieces.finish(state, run)
    run.write_summary({
        "model": family.name, "status": "complete", "steps": cfg.steps, "workers": worker.world,
        "batch_size": cfg.batch_size, "seconds": round(seconds, 2),
        "images_per_s": round(cfg.steps * cfg.batch_size / max(seconds, 1e-9), 1),
        # This attempt's wall clock in the worker: data, build and restore; the loop (evaluations and
        # checkpoints included); final evaluation and files. Ray's own start-up is the driver's.
        "startup_s": round(timing["startup_s"], 2), "train_s": round(timing["train_s"], 2),
        "finish_s": round(time.perf_counter() - timing["trained"], 2),
        **{key: round(value, 3) for key, value in worker.spent.items()},
        "seed": cfg.seed, "precision": worker.precision, "runner": worker.session.name, "finished_at": time.time(),
        **fields, **provenance(worker.device),
    })


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def params_sha256(model: torch.nn.Module) -> str:
    """Hash of the trainable parameters: identical across DDP ranks when they are in sync."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def write_worker_info(run: RunDir, rank: int, **info: Any) -> None:
    """workers/rank{r}.json: PID, host and state of each worker (for operators, py-spy, and tests)."""
    run.workers.mkdir(exist_ok=True)
    name = f"workers/rank{rank}.json"
    run.write_json(name, {**(run.read_json(name) or {}), **info, "updated": time.time()})


def stop_diverged(session, run: RunDir, step: int, loss: float, rank: int, scored: dict[str, float]) -> None:
    """Record a NaN/inf loss for the driver to report, and end this rank's loop cleanly (all ranks call).

    `scored`: the objective at its worst, reported with it (Tune refuses a result without its metric, and a
    sweep would end with that error)."""
    if rank == 0:
        run.record_divergence(step, loss)
    send_result(session, run, {"step": step, "diverged": 1, **scored}, None, rank)


def worker_threads(cfg) -> int:
    """A worker's torch threads: --cpus-per-worker; else OMP_NUM_THREADS, the usual way to tell a process its share
    of a shared node (Ray sets it in its workers to the CPUs they hold, unless it is set already); else the node's
    CPUs split between the workers. More threads than free cores cost far more than they give: a 300-step run of
    a tiny DenseNet took 38 s alone with 2 threads on 2 cores, 97 s beside one busy process, and 51 s there with
    one thread (docs/BENCHMARKS.md)."""
    if cfg.cpus_per_worker:
        return cfg.cpus_per_worker
    told = os.environ.get("OMP_NUM_THREADS", "").strip()
    if told.isdigit() and int(told) > 0:
        return int(told)
    return max(1, (os.cpu_count() or 1) // cfg.workers)


def augment_seed(seed: int, rank: int, step: int) -> int:
    # Reseeded at every checkpoint step, so a resumed run draws what the uninterrupted run drew.
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def reset_global_state(cfg) -> None:
    """Every piece of process-wide state a run depends on, set at its start: a run's numbers then do not depend
    on what ran before it in the same process (a Tune actor runs trial after trial)."""
    import random

    import numpy

    random.seed(cfg.seed)
    numpy.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)  # every device's default generator: identical initial weights on every rank
    torch.set_num_threads(worker_threads(cfg))
    torch.set_grad_enabled(True)
    torch.clear_autocast_cache()
    if cfg.compile:
        # Dynamo caches compiled frames per code object, 8 at most: trial after trial would fall back to eager.
        import torch._dynamo as dynamo

        dynamo.reset()
