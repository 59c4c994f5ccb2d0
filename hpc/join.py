"""python -m hpc.join OUT: this Slurm job's nodes join the Ray cluster of the sweep that runs in OUT, and leave it
drained.

    sbatch slurm/join.sh runs/tune                 # one node more for the sweep in runs/tune
    sbatch --array=1-8 slurm/join.sh runs/tune     # eight, each as Slurm frees a node
    python -m hpc.submit join runs/tune

A sweep that runs on a per-job Ray cluster (hpc.ray_cluster) publishes that cluster in OUT/ray-cluster.json: its
address and where its token file is. Each node of a join job starts a Ray worker there (`ray start --address`,
the token read from the owner's 0600 file through RAY_AUTH_TOKEN_PATH: never on a command line or in a log) and
stays until the sweep ends, the head job stops, or the job is told to leave.

Leaving with notice (SIGUSR1 from `--signal=B:USR1@N` before the time limit or `scancel --batch --signal=USR1`,
submitit's SIGUSR2, SIGTERM): the node is drained through Ray's own drain API (reason: preemption, with a
deadline). Ray then places nothing new on it, and the work running there sees it in `get_draining_nodes()`: a
sweep trial saves a checkpoint at its next step and says so in the drain registry below. Once every such
workload on the node has saved (or at the deadline) the node's raylet is stopped as a preempted node is: Ray
reports the lost actors as preempted, and Tune retries their trials without spending their failure budget.

The drain registry: Ray's internal KV, namespace DRAIN_NAMESPACE, keys `<node id>/<pid>`; a workload writes
`saving` when it sees its node draining and `parked` once its state is safe. hpc knows no more of the workload.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hpc.errors import UserError, run_cli
from hpc.ray_cluster import (CLUSTER_FILE, START_ATTEMPTS, STARTED, STOP_GRACE_S, _ignore_stop_signals, keep_logs,
                             log, log_since, log_size, failure_line, ray_env, remove_temp_dir, start_node, stop,
                             temp_dir)
from hpc.slurm import Allocation, cpus_on_node, gpus_on_node, node_ip, signal_step

SWEEP_CLUSTER = "ray-cluster.json"  # in a sweep's OUT: the Ray cluster it runs on (written by the sweep's driver)
DRAIN_NAMESPACE = "hpc-drain"
DRAIN_DEADLINE_S = 25  # Slurm SIGKILLs KillWait (default 30 s) after SIGTERM; USR1@180 leaves far more
SETTLE_S = 3.0  # how long a draining workload may take to notice (sweep trials poll every 0.5 s)
NOTICE = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP)
ENDED_EXIT = 0  # a join after its sweep ended is no failure: the rest of an array must not count as failed
JOIN_STEP = "hpc-join"  # the step of a join job of several nodes: one task a node


class Ended(Exception):
    """The sweep (or its head job) has ended: nothing to join, or nothing left to work for."""


def read_sweep(out: Path) -> dict:
    """OUT's published Ray cluster, checked: every refusal before a Ray process starts."""
    where = socket.gethostname()
    if not out.is_dir():
        raise UserError(f"{out} does not exist on {where}: the sweep folder must be on a file system that the head "
                        "job's and this job's nodes share (not /tmp); pass the path the head job was given as OUT")
    path = out / SWEEP_CLUSTER
    if not path.exists() and (out / CLUSTER_FILE).exists():  # a job folder (--worker-jobs): the job's own cluster
        path = out / CLUSTER_FILE
    try:
        info = json.loads(path.read_text())
        owner = path.stat().st_uid
    except FileNotFoundError:
        raise UserError(f"{out} holds no sweep running on a Ray cluster (no {SWEEP_CLUSTER}): start the sweep with "
                        "sbatch slurm/tune_densenet.sh (OUT=...) and join that OUT") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}; check the folder's permissions") from None
    if path.name == CLUSTER_FILE:
        info = {"address": info.get("address"), "token_file": info.get("token_file"),
                "dashboard": info.get("dashboard_url"), "job_dir": str(out),
                "state": "ended" if info.get("state") in ("ended", "interrupted") else info.get("state")}
    if owner != os.getuid():
        raise UserError(f"the sweep in {out} belongs to user {_user(owner)}: a job joins its own user's sweeps only")
    if info.get("state") == "ended":
        raise Ended(f"the sweep in {out} has ended: nothing to join")
    for key in ("address", "token_file"):
        if not info.get(key):
            raise UserError(f"{path} has no {key}: it was not written by a sweep on an hpc.ray_cluster job")
    token = Path(info["token_file"])
    if not token.is_file() or not os.access(token, os.R_OK):
        raise UserError(f"the sweep's token file {token} is missing or unreadable from {where}: it must be on a "
                        "file system the nodes share ($HPC_JOBS_DIR, or $HOME) and readable by you")
    if _head_state(info) in ("stopping", "ended", "interrupted"):
        raise Ended(f"the sweep's head job has stopped ({_head_state(info)}): nothing to join until it runs again")
    host, port = info["address"].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError:
        raise Ended(f"the sweep's Ray cluster at {info['address']} does not answer: its head job has ended or is "
                    "between requeues; nothing to join") from None
    return info


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _head_state(info: dict) -> str | None:
    try:
        return json.loads((Path(info["job_dir"]) / CLUSTER_FILE).read_text()).get("state")
    except (KeyError, TypeError, OSError, ValueError):
        return None


class Notice:
    """The job has been told to leave: which signal, once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in NOTICE:
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log(f"{signal.Signals(signum).name}: leaving the sweep; draining first")


def join(out: Path) -> int:
    """Join OUT's sweep on each node of this job; stay until it ends or until notice, then leave drained."""
    notice = Notice()
    try:
        info = read_sweep(out)
    except Ended as exc:
        log(str(exc))
        return ENDED_EXIT
    alloc = Allocation.from_env()
    if len(alloc.nodes) > 1 and not os.environ.get("HPC_JOIN_TASK"):
        return _join_every_node(out, alloc, notice)
    return _join_this_node(out, info, alloc, notice)


def _join_every_node(out: Path, alloc: Allocation, notice: Notice) -> int:
    """The batch script of a join job of several nodes: one task a node, each joining as a one-node job does.
    The notice goes to the batch script (`--signal=B:...`, `scancel --batch`): it is passed to every task, and
    each drains its own node."""
    n = len(alloc.nodes)
    log(f"job {alloc.job_id}: {n} nodes ({', '.join(alloc.nodes)}) join the sweep in {out}")
    step = subprocess.Popen(["srun", f"--job-name={JOIN_STEP}", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
                             sys.executable, "-m", "hpc.join", str(out)], stdin=subprocess.DEVNULL,
                            env={**os.environ, "HPC_JOIN_TASK": "1"})
    passed = False
    while step.poll() is None:
        if notice.signum is not None and not passed:
            signal_step(alloc.job_id, JOIN_STEP, signal.Signals(notice.signum).name.removeprefix("SIG"))
            passed = True
        time.sleep(0.5)
    return step.returncode


def _join_this_node(out: Path, info: dict, alloc: Allocation, notice: Notice) -> int:
    token_file = Path(info["token_file"])
    env = ray_env(token_file)
    ip, node = node_ip(alloc.this_node), alloc.this_node
    job_dir = Path(info.get("job_dir") or out)
    tmp = temp_dir(alloc.job_id, alloc.restart_count)
    log_file = job_dir / f"ray-join-{alloc.job_id}-{node}.log"
    cpus, gpus = cpus_on_node(), gpus_on_node()
    proc = None
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            offset = log_size(log_file)
            proc, ports = start_node(head=info["address"], dashboard=info.get("dashboard"), ip=ip, node=node,
                                     cpus=cpus, gpus=gpus, tmp=tmp, env=env, log_file=log_file)
            up = _wait_started(proc, log_file, offset, notice)
            if up:
                break
            if proc.poll() is not None and attempt < START_ATTEMPTS and notice.signum is None:
                log(f"the Ray worker on {node} failed to start ({failure_line(log_since(log_file, offset))}); "
                    f"retrying with new ports (attempt {attempt + 1} of {START_ATTEMPTS})")
                continue
            break
        else:
            return 1
        if proc.poll() is not None:
            raise UserError(f"the Ray worker on {node} could not join {info['address']}: "
                            f"{failure_line(log_since(log_file, offset))}; see {log_file}")
        log(f"job {alloc.job_id}: {node} ({ip}) joined the sweep in {out}: {cpus} CPUs, {gpus} GPUs; "
            f"Ray log {log_file}")
        reason = _stay(proc, out, info, notice)
        if reason == "notice":
            _drain(info, env, ip, ports["node-manager-port"], proc, node)
        return 0
    finally:
        _ignore_stop_signals()
        stop(proc, STOP_GRACE_S, "the Ray worker")
        keep_logs(tmp, job_dir, f"join-{alloc.job_id}-{node}", alloc.restart_count)
        remove_temp_dir(tmp)
        log(f"{node} left the sweep in {out}")


def _wait_started(proc: subprocess.Popen, log_file: Path, offset: int, notice: Notice) -> bool:
    end = time.monotonic() + 120
    while time.monotonic() < end and notice.signum is None:
        if STARTED in log_since(log_file, offset):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def _stay(proc: subprocess.Popen, out: Path, info: dict, notice: Notice) -> str:
    """Until the sweep ends ("ended"), this node's Ray stops ("exited"), or the job is told to leave ("notice")."""
    while True:
        if notice.signum is not None:
            return "notice"
        if proc.poll() is not None:
            log(f"this node's Ray stopped ({proc.returncode}; killed, or its head gone): leaving the sweep")
            return "exited"
        try:
            state = json.loads((out / SWEEP_CLUSTER).read_text()).get("state")
        except FileNotFoundError:
            state = None  # a job folder: its cluster.json says when the job stops
        except (OSError, ValueError):
            state = None
        if state == "ended" or _head_state(info) in ("stopping", "ended", "interrupted"):
            log(f"the sweep in {out} has ended")
            return "ended"
        time.sleep(1)


def _drain(info: dict, env: dict, ip: str, manager_port: int, proc: subprocess.Popen, node: str) -> None:
    """Drain this Ray node (reason: preemption), wait for its workloads to save, then stop its raylet as a
    preempted node stops: Ray then reports the actors that were on it as preempted."""
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=info["address"])
    node_id = next((nid.hex() for nid, n in gcs.get_all_node_info(timeout=10).items()
                    if n.node_manager_address == ip and n.node_manager_port == manager_port), None)
    if node_id is None:
        log("this node is no longer in the sweep's cluster: nothing to drain")
        return
    deadline = time.time() + DRAIN_DEADLINE_S
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   f"Slurm job {os.environ.get('SLURM_JOB_ID')} leaves", int(deadline * 1000))
    if not accepted:
        log(f"Ray refused to drain {node}: {why}; stopping it as is")
        return
    t0 = time.time()
    time.sleep(SETTLE_S)
    while time.time() < deadline:
        states = _drain_states(gcs, node_id)
        if all(s == b"parked" for s in states.values()):
            break
        time.sleep(0.25)
    states = _drain_states(gcs, node_id)
    saved = sum(s == b"parked" for s in states.values())
    log(f"{node} drained in {time.time() - t0:.1f} s: {saved} of {len(states)} workload(s) saved their state"
        + ("" if saved == len(states) else " (the others continue from their last checkpoint)"))
    _kill_raylet(proc)
    for key in states:
        gcs.internal_kv_del(key, False, DRAIN_NAMESPACE.encode())


def _drain_states(gcs, node_id: str) -> dict[bytes, bytes]:
    keys = gcs.internal_kv_keys(f"{node_id}/".encode(), DRAIN_NAMESPACE.encode())
    return {k: gcs.internal_kv_get(k, DRAIN_NAMESPACE.encode()) or b"" for k in keys}


def _kill_raylet(proc: subprocess.Popen) -> None:
    """SIGKILL the raylet (a graceful raylet stop is recorded as an expected termination, not a preemption)."""
    import ray  # noqa: F401  (Ray puts its bundled psutil on the path)
    import psutil

    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            if child.name().startswith("raylet"):
                child.kill()
    except psutil.Error:
        pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpc.join", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the sweep's folder (OUT of the head job), on a file system the nodes share")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    return join(out)


if __name__ == "__main__":
    run_cli(main)
