"""The Ray cluster a run or sweep trains on: reaching it, starting a local one, and what it can hold.

Ray Train and Tune wait without end, and without a word, for workers a fixed cluster can never hold, and
`ray.init` waits minutes on an address that does not answer: each is said in one line here instead.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading

from cifarray.config import check_batch_split
from cifarray.errors import UserError, handle_sigterm

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


def init_ray() -> None:
    """Join $RAY_ADDRESS, or start a local cluster sized to this process's allocation, with the dashboard.

    The dashboard is for the user, and for Ray Train: its placement-group cleaner asks the state API whether a
    run's controller is gone. Without it, a trial that Tune ends keeps its workers' CPUs reserved, and the cleaner
    writes "Failed to query Ray Train Controller actor state" into the job log every few seconds (measured: the
    dashboard costs no start-up time, 6.2 s against 6.5 s on 2 cores)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Workers' output reaches the job log: their warnings and errors are one line each, headed by trial and rank
    # (cifarray.train.workerlog); Ray's and Python's INFO records in the workers stay out of it. Ray colours each
    # line's "(pid=...)" head even in a file: not off a terminal.
    kwargs = dict(log_to_driver=True, configure_logging=True, logging_level="ERROR")
    # Ray Train's controller learns that its workers finished, and registers their checkpoints, when it next polls
    # them: every 2 s by default, which a short run waits out at its end (a 2-step run's finish took 6.2 s, 2.5 s
    # at 0.5 s: docs/BENCHMARKS.md). Ray Train passes the variable on to its controllers; one more poll RPC a worker.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:  # e.g. "auto" with no Ray running on this machine
            raise UserError(f"cannot join the Ray cluster at {address!r} (from --address or RAY_ADDRESS): "
                            f"{str(exc).splitlines()[0]} Start one, pass its HOST:PORT, or unset RAY_ADDRESS "
                            "to run on a local Ray") from None
    else:
        _start_local(kwargs)
    if threading.current_thread() is threading.main_thread():
        handle_sigterm()


def _private_token() -> None:
    """A local Ray of this run's own, with token authentication and a token only this run uses: a random token in a
    0600 file in a fresh 0700 folder, removed when the process ends. Ray's own default, ~/.ray/auth_token, is written
    0644 and shared by every run for ever. An explicit RAY_AUTH_MODE=disabled is honoured."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return
    from pathlib import Path

    from hpc.ray_cluster import new_token  # the token an hpc job's cluster gets, made the same way

    remove_stale_tokens(Path(tempfile.gettempdir()))
    folder = tempfile.mkdtemp(prefix=f"{TOKEN_PREFIX}{_owner_tag()}-")
    path = str(new_token(Path(folder)))
    atexit.register(shutil.rmtree, folder, True)  # Ray's processes read it when they start, all before the exit
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    # RAY_AUTH_MODE stays as it is: unset, ray.init turns token mode on for the new local cluster itself, in this
    # process's cached config too (set here, this process would still act as "disabled" and be refused).
    os.environ["RAY_AUTH_TOKEN_PATH"] = path


TOKEN_PREFIX = "cifarray-ray-token-"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _owner_tag(pid: int | None = None) -> str:
    """<PID namespace>.<PID> of the process a token folder belongs to: a PID means something only in its namespace
    (a container beside this one may run a live process under a PID that is free here)."""
    return f"{_pid_namespace()}.{os.getpid() if pid is None else pid}"


def remove_stale_tokens(tmp: "Path") -> list[str]:
    """Remove the token folders of this user's runs that ended without their exit hook (SIGKILL, a node's OOM
    killer): their Ray went with them, and the tokens would otherwise pile up in /tmp. Only folders named for a
    process of this PID namespace that no longer exists; others (another user's, another namespace's, a live run's,
    one named before PIDs were in the name) are left alone. Returns the names removed."""
    ns = _pid_namespace()
    removed = []
    for folder in tmp.glob(f"{TOKEN_PREFIX}{ns}.*-*"):
        pid = folder.name[len(TOKEN_PREFIX) + len(ns) + 1:].split("-")[0]
        try:
            info = folder.lstat()
            if not pid.isdigit() or info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode):
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
        except OSError:  # gone meanwhile, or a live process of another user: not ours to judge
            continue
    return removed


def _start_local(kwargs: dict) -> None:
    import ray

    _private_token()
    # Ray Train starts a PreemptionWatcher actor per worker group, to tell workers that their node is draining. A
    # local Ray of this run's own (its token private) has one node that nobody drains: the watcher would be one
    # more Python process to start beside the worker (Ray Train's 7th for a one-worker run, docs/BENCHMARKS.md).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

    # Ray's state API (Ray Train's placement-group cleaner uses it from inside the cluster) otherwise looks for
    # "the" Ray cluster on this machine, and fails when another job runs one here too; the Ray processes started
    # below inherit this variable. The port is picked free, then bound by Ray's dashboard a moment later; another
    # process can take it in between, and ray.init then fails at once ("already occupied"): a new port almost
    # surely works.
    for attempt in range(1, DASHBOARD_ATTEMPTS + 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        try:
            ray.init(include_dashboard=True, dashboard_port=port, **local_resources(), **kwargs)
            atexit.register(_stop_autoscaler_monitor)  # runs before Ray's own exit hook (registered at import)
            return
        except ValueError as exc:
            if "already occupied" not in str(exc) or attempt == DASHBOARD_ATTEMPTS:
                raise
            ray.shutdown()
            print(f"the Ray dashboard's port {port} was taken meanwhile; starting Ray again on another", flush=True)


def _stop_autoscaler_monitor() -> None:
    """End the local Ray's autoscaler monitor before Ray's own exit hook stops the cluster.

    That hook stops the GCS before the monitor, and the monitor's SIGTERM handler then writes "the autoscaler
    failed" to the GCS that is gone: it hangs there until Ray SIGKILLs it one second later, on every exit of a
    process that started a local Ray (measured: 1.02 s of the 1.95 s `ray.shutdown` took at a run's exit). A local
    Ray of this run's own has no autoscaler to stop gracefully: its cluster is this one node."""
    import ray._private.worker as worker
    from ray._private.ray_constants import PROCESS_TYPE_MONITOR

    for info in getattr(worker._global_node, "all_processes", {}).get(PROCESS_TYPE_MONITOR, []):
        if info.process.poll() is None:
            info.process.kill()
            try:
                info.process.wait(timeout=1)
            except subprocess.TimeoutExpired:  # stuck in the kernel: Ray's shutdown reaps it, as it would have
                pass


def local_resources() -> dict[str, int]:
    """What a local Ray may count: the CPUs this process may run on (its affinity mask: `taskset`, a Slurm job's
    cpuset; at most SLURM_CPUS_ON_NODE inside an allocation) and the GPUs CUDA_VISIBLE_DEVICES leaves visible.

    Ray itself counts every CPU of the node (it does not read cgroup v2 cpusets), and a sweep would plan trials
    on CPUs the job does not own."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    found = {"num_cpus": cpus}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        found["num_gpus"] = len(ids[:next((i for i, d in enumerate(ids) if d.startswith("-")), len(ids))])
    return found


def check_local_gpus(needed: float, address: str | None, asked: str, fix: str) -> None:
    """With no Ray cluster named, Ray starts on this machine and counts its GPUs: too few is said here, before
    Ray starts (~10 s) and before anything is written. Counted as torch counts them (CUDA_VISIBLE_DEVICES
    honoured): a GPU that torch cannot use would fail in the worker anyway."""
    if not needed or address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    have = torch.cuda.device_count()
    if have < math.ceil(needed - 1e-9):
        gpus = f"{have} GPU(s)" if have else "no GPU"
        raise UserError(f"{asked} but this machine has {gpus} that torch can use (and no Ray cluster is named: "
                        f"--address / RAY_ADDRESS); {fix}")


def scale_to_cluster(cfg):
    """--workers auto: one DDP worker per GPU of the Ray cluster (GPU training), else one per node."""
    import ray

    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if cfg.gpu and not gpus:  # --gpu is an order: training on the CPU instead would be a silent surprise
        raise UserError("--gpu with --workers auto, but the Ray cluster has no GPU; drop --gpu to train on "
                        "its CPUs (one worker per node), or join a cluster with GPU nodes")
    workers = gpus or nodes
    # The config would say "--workers 3", a flag the user never gave.
    fits = max(w for w in range(1, workers + 1) if cfg.batch_size % w == 0)
    check_batch_split(cfg.batch_size, workers, f"--workers auto: {workers} worker(s) "
                      f"({'one per GPU' if gpus else 'one per node'}) do not divide --batch-size {cfg.batch_size}",
                      f"pass --workers {fits}, or a --batch-size divisible by {workers}")
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
