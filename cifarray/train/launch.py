"""The driver side of training: validate, prepare the run folder, start Ray Train, show progress.

Everything that can be wrong with the user's input is checked here, before Ray
starts (`check_inputs`): the config, the parameter budget, the data, and whether the
validation split, the batch and each worker's shard fit the data. Rerunning the same command with
the same --out resumes from the last checkpoint (Ray Train V2 restores a run from
its storage path and name); a finished run is not trained again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sys
import threading
from typing import TYPE_CHECKING, Callable

from cifarray.config import to_dict
from cifarray.data.cifar import NUM_FINE, load_cifar100
from cifarray.data.synth import synthetic_for_run
from cifarray.errors import UserError, handle_sigterm
from cifarray.rundir import RunDir, read_metrics

if TYPE_CHECKING:
    from cifarray.train.engine import Family, RunContext

RAY_RUN_NAME = "ray"  # RUN_DIR/ray holds Ray Train's checkpoints; a stable name lets reruns find them


class TrainingDiverged(UserError):
    pass


def _check_resumable(run: RunDir, resolved: dict, cfg) -> bool:
    """True when RUN_DIR already holds this run finished; raises if it holds a different one."""
    saved = run.read_json("config.json")
    if saved is None:
        return False
    # May change between attempts without changing what is trained (graphs change how a step runs, not its maths).
    ignore = {"max_failures", "log_every", "cuda_graphs"}
    # A setting added after the run was written is absent from its config.json: the run used its default.
    defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                for f in dataclasses.fields(cfg) if f.name not in saved}
    diff = sorted(k for k in set(saved) | set(resolved)
                  if k not in ignore and saved.get(k, defaults.get(k)) != resolved.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k, defaults.get(k))!r} -> {resolved.get(k)!r}" for k in diff[:4])
        raise UserError(f"{run.path} holds a run with other settings ({shown}); pass another --out, "
                        "or rerun with the same settings to resume it")
    summary = run.read_json("summary.json")
    return bool(summary and summary.get("status") == "complete")


def check_data_fits(cfg, n_train: int, source: str, flag=lambda key: "--" + key.replace("_", "-")) -> None:
    """The validation split, the batch and each worker's shard must fit the data: checked before Ray starts.

    `n_train` counts the training images before the validation split is carved from them; `flag` names
    a setting the way the user gave it (a CLI flag, or a sweep-file key).
    """
    val, batch = flag("val_size"), flag("batch_size")
    if not 0 <= cfg.val_size < n_train:
        raise UserError(f"{val} {cfg.val_size} leaves no training images: {source} has {n_train:,} training "
                        f"images; lower {val} below {n_train} (e.g. {n_train // 10})")
    left = n_train - cfg.val_size
    workers = cfg.workers or 1
    shard, per_worker = left // workers, cfg.batch_size // workers
    if per_worker > shard:
        where = f"{shard:,} per worker for {workers} workers, of the " if workers > 1 else ""
        raise UserError(f"{batch} {cfg.batch_size} is larger than the training images ({where}{left:,} left of "
                        f"{source}'s {n_train:,} after the {cfg.val_size:,} validation images); lower {batch} "
                        f"or {val}")


def check_inputs(cfg, family: "Family", auto: bool = False) -> int:
    """Everything the config and the data can be wrong about, before Ray starts and before --out is touched
    (an --out that is a file is refused by the run lock, which comes next).

    Returns the number of training images (before the validation split).
    """
    family.enforce_budget(cfg)  # an over-budget model never reaches Ray
    n_train, source = training_images(cfg.synthetic, cfg.synthetic_train_per_class, cfg.data_dir, cfg.no_verify)
    check_data_fits(cfg, n_train, source)
    if os.environ.get("RAY_ADDRESS"):
        check_reachable(os.environ["RAY_ADDRESS"])
    if cfg.gpu:  # `auto`: as many workers as GPUs, so one is enough
        workers = 1 if auto else cfg.workers
        check_local_gpus(workers, None, "--gpu with --workers auto needs a GPU" if auto else
                         f"--gpu with {workers} worker(s) needs {workers} GPU(s)",
                         f"drop --gpu{', or lower --workers' if workers > 1 else ''}, or set RAY_ADDRESS to a Ray "
                         "cluster with GPUs")
    return n_train


def check_local_gpus(needed: float, address: str | None, asked: str, fix: str) -> None:
    """With no Ray cluster named, Ray starts on this machine and counts its GPUs: too few is said here, before
    Ray starts (~10 s) and before anything is written. Counted as torch counts them (CUDA_VISIBLE_DEVICES
    honoured): a GPU that torch cannot use would fail in the worker anyway."""
    if not needed or address or os.environ.get("RAY_ADDRESS"):
        return
    import math

    import torch

    have = torch.cuda.device_count()
    if have < math.ceil(needed - 1e-9):
        gpus = f"{have} GPU(s)" if have else "no GPU"
        raise UserError(f"{asked} but this machine has {gpus} that torch can use (and no Ray cluster is named: "
                        f"--address / RAY_ADDRESS); {fix}")


def training_images(synthetic: bool, per_class: int, data_dir, no_verify: bool) -> tuple[int, str]:
    """(training images before the validation split, how to name the data in an error).

    Real data is loaded whole (md5 unless no_verify, structure), so that it fails here, with the file
    named, not in a worker; procedural data is counted from its settings before it is written.
    """
    if synthetic:
        return per_class * NUM_FINE, "the procedural data set"
    return len(load_cifar100(data_dir, verify=not no_verify).train), str(data_dir)


def prepare_run(cfg, family: "Family") -> tuple[RunDir, dict, bool]:
    """The run folder: resume check, then procedural data and config.json (data already checked by the caller)."""
    run, resolved, done = resume_state(cfg, family)
    if not done:
        write_run(run, resolved, cfg)
    return run, resolved, done


def resume_state(cfg, family: "Family") -> tuple[RunDir, dict, bool]:
    """(run folder, resolved config, finished already?), writing nothing: a refused run leaves --out as it was."""
    family.enforce_budget(cfg)
    run = RunDir(cfg.out)
    resolved = to_dict(cfg) | {"out": str(run.path)}
    return run, resolved, _check_resumable(run, resolved, cfg)


def write_run(run: RunDir, resolved: dict, cfg) -> None:
    """Procedural data (when asked for) and config.json: what a rerun resumes against."""
    if cfg.synthetic:
        synthetic_for_run(run.data, train_per_class=cfg.synthetic_train_per_class,
                          test_per_class=cfg.synthetic_test_per_class, seed=cfg.seed,
                          difficulty=cfg.synthetic_difficulty)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_json("config.json", resolved)
    return run, resolved, False


DASHBOARD_ATTEMPTS = 3


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT Ray address must accept a connection: ray.init waits minutes on one that does not
    (measured: Ray's own warnings for 10 minutes for a closed port, until `timeout` killed it)."""
    if "://" in address or address == "auto" or ":" not in address:
        return  # Ray client / "auto": ray.init itself says what is wrong, quickly
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except ValueError:
        raise UserError(f"Ray address {address!r} (from --address or RAY_ADDRESS) is not HOST:PORT") from None
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} (from --address or RAY_ADDRESS): "
                        f"{exc.strerror or exc}; check the address (the head's GCS port, 6379 by default), or "
                        "unset RAY_ADDRESS to run on a local Ray") from None


def init_ray(cfg, dashboard: bool = False) -> None:
    """Join $RAY_ADDRESS, or start a local cluster (with the dashboard when asked: the tuner needs it)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Workers write metrics that the driver renders; their own stdout would interleave with it.
    kwargs = dict(log_to_driver=False, configure_logging=True, logging_level="ERROR")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:  # e.g. "auto" with no Ray running on this machine
            raise UserError(f"cannot join the Ray cluster at {address!r} (from --address or RAY_ADDRESS): "
                            f"{str(exc).splitlines()[0]} Start one, pass its HOST:PORT, or unset RAY_ADDRESS "
                            "to run on a local Ray") from None
    elif dashboard:
        # Ray's state API (Ray Train's placement-group cleaner uses it from inside the cluster) otherwise
        # looks for "the" Ray cluster on this machine, and fails when another job runs one here too; the
        # Ray processes started below inherit this variable.
        # The port is picked free, then bound by Ray's dashboard a moment later; another process can take it
        # in between, and ray.init then fails at once ("already occupied"): a new port almost surely works.
        for attempt in range(1, DASHBOARD_ATTEMPTS + 1):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            try:
                ray.init(include_dashboard=True, dashboard_port=port, **kwargs)
                break
            except ValueError as exc:
                if "already occupied" not in str(exc) or attempt == DASHBOARD_ATTEMPTS:
                    raise
                ray.shutdown()
                print(f"the Ray dashboard's port {port} was taken meanwhile; starting Ray again on another",
                      flush=True)
    else:
        ray.init(include_dashboard=False, **kwargs)
    if threading.current_thread() is threading.main_thread():
        handle_sigterm()


def scale_to_cluster(cfg):
    """--workers auto: one DDP worker per GPU of the Ray cluster (GPU training), else one per node."""
    import dataclasses

    import ray

    init_ray(cfg)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if cfg.gpu and not gpus:  # --gpu is an order: training on the CPU instead would be a silent surprise
        raise UserError("--gpu with --workers auto, but the Ray cluster has no GPU; drop --gpu to train on "
                        "its CPUs (one worker per node), or join a cluster with GPU nodes")
    workers = gpus or nodes
    if cfg.batch_size % workers:  # the config would say "--workers 3", a flag the user never gave
        fits = max(w for w in range(1, workers + 1) if cfg.batch_size % w == 0)
        raise UserError(f"--workers auto: {workers} worker(s) ({'one per GPU' if gpus else 'one per node'}) do "
                        f"not divide --batch-size {cfg.batch_size}; pass --workers {fits}, or a --batch-size "
                        f"divisible by {workers}")
    print(f"--workers auto: {workers} worker(s), {'one per GPU' if gpus else 'one per node, on CPU'}", flush=True)
    return dataclasses.replace(cfg, workers=workers, gpu=bool(gpus))


def workers_that_fit(nodes: list[dict], cpus: float, gpus: float) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs the nodes hold at most (each on one node, as a Ray
    placement-group bundle is); `nodes`: each alive node's total resources."""
    def room(res: dict) -> int:
        n = int(res.get("CPU", 0) / cpus + 1e-9)
        return min(n, int(res.get("GPU", 0) / gpus + 1e-9)) if gpus else n

    return sum(room(r) for r in nodes)


def describe_cluster(nodes: list[dict]) -> str:
    cpu_total = sum(r.get("CPU", 0) for r in nodes)
    gpu_total = sum(r.get("GPU", 0) for r in nodes)
    return (f"{len(nodes)} node(s) with {cpu_total:g} CPU(s) and "
            f"{f'{gpu_total:g} GPU(s)' if gpu_total else 'no GPU'} in all")


def check_cluster_fits(cfg, cpus: int, nodes: list[dict]) -> None:
    """Refuse workers that this Ray cluster can never hold (`nodes`: each alive node's total resources).

    Ray Train waits for its workers' CPUs and GPUs without end, silently (an autoscaler might add nodes);
    on a fixed cluster (a Slurm job's, or the local one) such a run would hang until killed. A worker is
    one bundle of `cpus` CPUs (and one GPU with --gpu) on a single node."""
    fits = workers_that_fit(nodes, cpus, 1 if cfg.gpu else 0)
    if fits >= cfg.workers:
        return
    gpu_total = sum(r.get("GPU", 0) for r in nodes)
    cluster = describe_cluster(nodes)
    each = f"{cpus} CPU(s){' and 1 GPU' if cfg.gpu else ''} each"
    if cfg.gpu and not gpu_total:
        fix = "drop --gpu, or run where Ray sees a GPU (a GPU node; check CUDA_VISIBLE_DEVICES)"
    elif fits:
        fix = f"lower --workers to {fits} or less{'' if cfg.gpu else ' (or --cpus-per-worker)'}, or run on more nodes"
    else:
        fix = "lower --cpus-per-worker, or run on bigger nodes"
    raise UserError(f"{cfg.workers} worker(s) with {each} do not fit this Ray cluster ({cluster}; room for "
                    f"{fits}); {fix}")


def fit(cfg, family: "Family", context: "RunContext | None" = None, what: str | None = None) -> dict:
    """Run training to completion (or resume it) and return summary.json.

    `context`: what the workers get besides the config (default: the family's driver_context(cfg))."""
    run, resolved, done = resume_state(cfg, family)
    if done:
        print(f"{run.path}: run already complete; nothing to do (summary.json)")
        return run.read_json("summary.json")
    check_checkpoints(run)  # before Ray: a run none of whose checkpoints loads would fail in every worker restart
    import ray

    init_ray(cfg)
    cpus = cfg.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.workers)
    # Before config.json is written: a run refused here can be rerun on the same --out with other --workers.
    check_cluster_fits(cfg, cpus, [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")])
    write_run(run, resolved, cfg)
    if context is None:
        context = family.driver_context(cfg)
    trainer = build_trainer(cfg, run, family.train_fn(context), resolved, cpus)
    resumed = run.read_json("last_checkpoint.json")
    start = f"resuming (last checkpoint written: step {resumed['step']})" if resumed else "starting"
    print(f"{what or family.name}: {start}; {cfg.steps} steps, batch {cfg.batch_size}, {cfg.workers} worker(s) "
          f"({'GPU' if cfg.gpu else f'{cpus} CPU'} each); run folder {run.path}", flush=True)
    with Progress(run, cfg.steps, family.progress_keys):
        from ray.train import TrainingFailedError

        try:
            fit_off_the_main_thread(trainer)
        except TrainingFailedError as exc:
            raise RuntimeError(f"training failed after {cfg.max_failures} restart(s): {exc}") from exc
    diverged = run.read_json("diverged.json")
    if diverged:
        run.path.joinpath("diverged.json").rename(run.path / f"diverged-step{diverged['step']}.json")
        last = diverged["last_checkpoint_step"]
        kept = (f"the last good checkpoint (step {last}) is kept in {run.path / RAY_RUN_NAME}" if last
                else "no checkpoint had been saved yet")
        raise TrainingDiverged(f"training diverged: loss became {diverged['loss']} at step {diverged['step']}; "
                               f"{kept}; lower --lr and pass another --out")
    summary = run.read_json("summary.json")
    if not summary:
        raise RuntimeError(f"training ended without writing {run.summary}")
    drop_unregistered_checkpoints(run)
    return summary


def check_checkpoints(run: RunDir) -> None:
    """Name each of the run's checkpoints that does not load (the workers skip it and resume from the one before);
    when none loads, a one-line error with the fix, before Ray starts."""
    from cifarray.train.common import load_resume_point

    found = sorted((d for d in (run.path / RAY_RUN_NAME).glob("checkpoint_*") if d.is_dir()),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    if found:
        load_resume_point(found[0], say=lambda line: print(line, flush=True))


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
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def drop_unregistered_checkpoints(run: RunDir) -> list[str]:
    """Delete the RUN_DIR/ray/checkpoint_* folders that Ray Train's checkpoint manager does not list.

    A worker writes its checkpoint before the controller registers it (at its next poll, every 2 s),
    so a worker killed in between leaves a folder that Ray never deletes: num_to_keep counts only the
    registered ones. Called once a run has finished; without a readable snapshot nothing is deleted."""
    storage = run.path / RAY_RUN_NAME
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        kept = {c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not kept:
        return []
    dropped = [d.name for d in storage.glob("checkpoint_*") if d.is_dir() and d.name not in kept]
    for name in dropped:
        shutil.rmtree(storage / name, ignore_errors=True)
    return dropped


def build_trainer(cfg, run: RunDir, train_fn: Callable[[dict], None], resolved: dict, cpus: float,
                  callbacks: list | None = None, gpus: float = 1.0):
    """The TorchTrainer of one run; its storage (RUN_DIR/ray) is where a rerun resumes from.

    `gpus`: per worker when cfg.gpu (a fraction packs several one-worker sweep trials on a GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_fn,
        train_loop_config=resolved,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": gpus} if cfg.gpu else {})}),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=str(run.path),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )


class Progress:
    """Render rank 0's metrics.csv while training runs: a Rich bar on a TTY, plain lines otherwise."""

    def __init__(self, run: RunDir, total: int, keys: tuple[str, ...], interval: float = 1.0):
        self.run, self.total, self.keys, self.interval = run, total, keys, interval
        self._stop = threading.Event()
        self._seen = len(read_metrics(run.metrics))
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.tty = sys.stdout.isatty()

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _fmt(self, row: dict[str, str]) -> str:
        parts = []
        for k in self.keys:
            v = row.get(k, "")
            if v not in ("", "nan"):
                parts.append(f"{k} {float(v):.4g}")
        return "  ".join(parts)

    def _loop(self) -> None:
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            display = Bar(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                          TextColumn("{task.description}"), TimeRemainingColumn(), transient=False)
            task = display.add_task("", total=self.total)

            def show(row: dict[str, str]) -> None:
                display.update(task, completed=int(row["step"]), description=self._fmt(row))
        else:
            display = contextlib.nullcontext()

            def show(row: dict[str, str]) -> None:
                print(f"step {int(row['step']):>7d}/{self.total}  {self._fmt(row)}", flush=True)
        with display:
            while True:
                stopping = self._stop.is_set()
                self._tick(show, every_row=not self.tty)  # a bar shows the newest row; logs show every row
                if stopping:
                    return  # that was the last look, after training ended
                self._stop.wait(self.interval)

    def _tick(self, show: Callable[[dict[str, str]], None], every_row: bool = False) -> None:
        rows = read_metrics(self.run.metrics)
        new = rows[self._seen:] if len(rows) >= self._seen else rows
        self._seen = len(rows)
        for row in (new if every_row else new[-1:]):
            show(row)
