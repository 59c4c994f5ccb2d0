"""The driver side of training: validate the inputs, then train the run folder, in this process (the local runner)
or through a Ray Train TorchTrainer.

The Ray cluster's side is `cifarray.train.cluster`, the run folder's `cifarray.train.runfolder`, the progress
display `cifarray.train.progress`.

Everything that can be wrong with the user's input is checked here, before Ray
starts (`check_inputs`): the config, the parameter budget, the data, and whether the
validation split, the batch and each worker's shard fit the data. Rerunning the same command with
the same --out resumes from the last checkpoint (Ray Train V2 restores a run from
its storage path and name); a finished run is not trained again.

Runners (`--runner`): `local` trains one worker in this process through the same engine, with no Ray at all (a
2-step run starts in seconds, not in the ~20 s of Ray and the TorchTrainer controller); `ray` is a TorchTrainer
(DDP, a Ray cluster, worker restarts after a failure); `auto` picks `local` for one worker with no Ray cluster to
join, else `ray`. Both write the same files and rows, and keep their checkpoints in RUN_DIR/ray: a run resumes
from the newest one, whichever runner wrote it.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Callable

from cifarray.errors import UserError, waits_in_ray
from cifarray.models.budget import enforce_budget
from cifarray.phases import mark
from cifarray.rundir import RunDir
from cifarray.train.cluster import check_cluster_fits, check_local_gpus, check_reachable, init_ray
from cifarray.train.progress import Progress
from cifarray.train.runfolder import (RAY_RUN_NAME, check_checkpoints, divergence_error, drop_unregistered_checkpoints,
                                      resume_state, write_run)

if TYPE_CHECKING:
    from cifarray.family import Family, RunContext


LOCAL, RAY = "local", "ray"
RUNNERS = ("auto", LOCAL, RAY)


def pick_runner(asked: str, workers: int | None, auto_workers: bool, address: str | None) -> str:
    """`local` or `ray` for `--runner asked` (auto | local | ray); a runner that cannot run the job is a UserError.

    `address`: --address (an explicit Ray cluster); $RAY_ADDRESS makes `auto` pick Ray but does not refuse an
    explicit `local` (a job script may export it for other commands)."""
    if asked == LOCAL:
        fix = "drop --runner local (Ray Train runs it)"
        if auto_workers:
            raise UserError(f"--runner local trains one worker in this process, and --workers auto sizes a run to a "
                            f"Ray cluster; {fix}, or pass --workers 1")
        if (workers or 1) != 1:
            raise UserError(f"--runner local trains one worker in this process, not --workers {workers} (DDP needs "
                            f"Ray Train); {fix}, or pass --workers 1")
        if address:
            raise UserError(f"--runner local trains in this process without Ray, so it cannot join --address "
                            f"{address}; drop --runner local, or drop --address")
        return LOCAL
    if asked == RAY:
        return RAY
    one = (workers or 1) == 1 and not auto_workers
    return LOCAL if one and not (address or os.environ.get("RAY_ADDRESS")) else RAY


def check_inputs(cfg, family: "Family", auto: bool = False, runner: str = RAY) -> int:
    """Everything the config and the data can be wrong about, before Ray starts and before --out is touched
    (an --out that is a file is refused by the run lock, which comes next).

    Returns the number of training images (before the validation split).
    """
    enforce_budget(cfg)  # an over-budget model never reaches Ray (the one budget check of the CLI's path)
    source = cfg.data_source()
    n_train = source.training_images()
    source.check_fits(cfg.batch_size, cfg.workers, n_train)
    if runner == RAY and os.environ.get("RAY_ADDRESS"):
        check_reachable(os.environ["RAY_ADDRESS"])
    if cfg.gpu:  # `auto`: as many workers as GPUs, so one is enough
        workers = 1 if auto else cfg.workers
        check_local_gpus(workers, None, "--gpu with --workers auto needs a GPU" if auto else
                         f"--gpu with {workers} worker(s) needs {workers} GPU(s)",
                         f"drop --gpu{', or lower --workers' if workers > 1 else ''}, or set RAY_ADDRESS to a Ray "
                         "cluster with GPUs")
    return n_train


def fit(cfg, family: "Family", context: "RunContext | None" = None, what: str | None = None,
        runner: str = RAY) -> dict:
    """Run training to completion (or resume it) and return summary.json.

    `context`: what the workers get besides the config (default: the family's driver_context(cfg));
    `runner`: LOCAL (this process) or RAY (a TorchTrainer)."""
    run, resolved, done = resume_state(cfg)
    if done:
        print(f"{run.path}: run already complete; nothing to do (summary.json)")
        return run.read_summary()
    check_checkpoints(run)  # before Ray: a run none of whose checkpoints loads would fail in every worker restart
    if runner == LOCAL:
        _fit_here(cfg, family, run, resolved, context, what)
    else:
        _fit_with_ray(cfg, family, run, resolved, context, what)
    diverged = run.take_divergence()
    if diverged:
        raise divergence_error(run, diverged)
    summary = run.read_summary()
    if not summary:
        raise RuntimeError(f"training ended without writing {run.summary}")
    drop_unregistered_checkpoints(run)
    return summary


def _starting(cfg, family: "Family", run: RunDir, what: str | None, where: str) -> None:
    resumed = run.last_checkpoint_step()
    start = f"resuming (last checkpoint written: step {resumed})" if resumed is not None else "starting"
    print(f"{what or family.name}: {start}; {cfg.steps} steps, batch {cfg.batch_size}, {where}; run folder {run.path}",
          flush=True)


def _fit_here(cfg, family: "Family", run: RunDir, resolved: dict, context: "RunContext | None",
              what: str | None) -> None:
    """The local runner: the engine in this process (no Ray), on the GPU with --gpu (check_inputs found one).

    Ctrl-C and SIGTERM interrupt the step in progress; the run resumes from its last checkpoint, as with Ray."""
    from cifarray.train.engine import train
    from cifarray.train.session import LocalSession

    write_run(run, resolved, cfg)
    if context is None:
        context = family.driver_context(cfg)
    session = LocalSession(run.path, "cuda" if cfg.gpu else "cpu")
    _starting(cfg, family, run, what, f"1 worker in this process ({'GPU' if cfg.gpu else 'CPU'}; runner local)")
    with Progress(run, cfg.steps, family.display.progress_keys):
        train(family, resolved, session, context)


def _fit_with_ray(cfg, family: "Family", run: RunDir, resolved: dict, context: "RunContext | None",
                  what: str | None) -> None:
    import ray

    from cifarray.train.engine import TrainLoop

    init_ray()
    mark("ray_up")
    cpus = cfg.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.workers)
    # Before config.json is written: a run refused here can be rerun on the same --out with other --workers.
    check_cluster_fits(cfg, cpus, [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")])
    write_run(run, resolved, cfg)
    if context is None:
        context = family.driver_context(cfg)
    trainer = build_trainer(cfg, run, TrainLoop(family, context), resolved, cpus)
    _starting(cfg, family, run, what, f"{cfg.workers} worker(s) ({'GPU' if cfg.gpu else f'{cpus} CPU'} each)")
    with Progress(run, cfg.steps, family.display.progress_keys):
        from ray.train import TrainingFailedError

        try:
            fit_off_the_main_thread(trainer)
        except TrainingFailedError as exc:
            raise RuntimeError(f"training failed after {cfg.max_failures} restart(s): {exc}") from exc


def fit_off_the_main_thread(trainer) -> object:
    """trainer.fit() in a thread, the main thread waiting on it: Ctrl-C then ends a run as SIGTERM does.

    Called from the main thread, Ray Train V2's fit installs its own SIGINT handler, which aborts the controller
    and then exits with status 1 and no message (its own comment: "for some reason the process still exits
    with 1"); from another thread (as in Tune) it installs none. The main thread gets the KeyboardInterrupt,
    the CLI says "interrupted" and exits 130, and the run resumes from its last checkpoint."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread, which raises it
            box["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    waits_in_ray(thread)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def build_trainer(cfg, run: RunDir, train_fn: Callable[[dict], None], resolved: dict, cpus: float,
                  callbacks: list | None = None, gpus: float = 1.0):
    """The TorchTrainer of one run; its storage (RUN_DIR/ray) is where a rerun resumes from.

    `gpus`: per worker when cfg.gpu (a fraction packs several one-worker sweep trials on a GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_fn,
        train_loop_config=resolved,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": gpus} if cfg.gpu else {})}),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=str(run.path),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks,
                             # Ray Train's INFO (a line per report and per worker-group start) stays out of the log.
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
