"""python -m hpc.ray_cluster -- CMD ...: a Ray cluster for the life of one Slurm job, and CMD run on it.

    sbatch --nodes=2 --wrap "python -m hpc.ray_cluster -- python -m cifarray.tune --synthetic --out runs/t"

Run by the batch step (the job's first node): a Ray head here, one Ray worker on each other node
(one srun step), CPUs and GPUs as Slurm allocated them, ports picked free on each node so that
two jobs sharing a node never collide, Ray's temp dir on each node inside a fresh private root (0700, a
name nobody can predict, short enough for Ray's 107-byte socket paths). Token authentication is on: a random token
in a 0600 file in the job's folder (~/.hpc-ray/jobs/<job id>/, or $HPC_JOBS_DIR/<job id>), checked
at the head before the log says so, so other users of the cluster cannot run code on this job's Ray
cluster. When every node has joined, CMD runs with RAY_ADDRESS and
the token set; its exit status is this command's. Everything is torn down when CMD ends and on
SIGTERM/SIGINT/SIGHUP (scancel, requeue, preemption, the --signal before the time limit); each node's
Ray logs are then copied from its temp dir into the job's folder (ray-logs/<node>).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpc.errors import UserError, handle_sigterm, run_cli
from hpc.dashboard import Dashboard, DashboardError
from hpc.slurm import Allocation, cpus_on_node, gpus_on_node, node_ip, signal_step

CLUSTER_FILE = "cluster.json"
NODE_LABEL = "slurm-node"
TOKEN_FILE = "token"
LOGS_DIR = "ray-logs"  # each node's Ray session logs, copied here at teardown (keep_logs)
SOCKET_PATH_MAX = 107
SESSION_SUFFIX = len("/session_2026-11-25_22-16-44_882869_4194304/sockets/plasma_store")
MKDTEMP_CHARS = 8  # the random part of a tempfile.mkdtemp name
RAY_DIR = "ray"  # Ray's temp dir, inside the job's private root on the node (temp_dir)
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
HEAD_PORTS = ("--port", "--dashboard-port", "--ray-client-server-port")
# The head's two Prometheus endpoints have no flag, only these variables, and fixed defaults (44227, 44217) that two
# jobs on one node would collide on: picked per job too.
HEAD_PORT_VARS = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")
WORKER_STEP = "ray-workers"
INTERRUPTED = 130  # exit status when SIGTERM/SIGINT stopped the cluster (scancel, requeue, preemption)
STOP_GRACE_S = 30  # `ray start --block` drains (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S) before it stops its processes
# A port picked free (free_ports) can be taken by another process before Ray binds it; `ray start` then
# exits during start-up (in 1 s for the dashboard's port, ~35 s for the raylet's), and a new set of ports
# almost surely works.
START_ATTEMPTS = 3
STARTED = "Ray runtime started"  # what `ray start` prints once its node is up


def log(msg: str) -> None:
    print(f"[hpc] {msg}", flush=True)


def free_ports(n: int) -> list[int]:
    """n distinct ports free on this node right now. Ray is given every port explicitly: its fixed
    defaults (6379, 8265, 52365, 10001, ...) are what two jobs on one node would collide on."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def temp_dir(job_id: str, restart_count: int) -> Path:
    """This node's Ray temp dir (its --temp-dir), RAY_DIR inside a fresh private root made now by tempfile.mkdtemp:
    mode 0700 and a name nobody can predict. Ray makes its temp dir and its session, sockets and logs folders mode
    777 (ray._common.utils.try_to_create_directory); inside the private root, other users of the node can neither
    read them nor replace a socket, and a folder or link planted beforehand at a name like it is never used. The
    caller removes the root at teardown (remove_temp_dir); what an earlier run of a requeued job left (Slurm may
    SIGKILL a teardown) is removed here, when it is this user's and private. Refused in one line, before anything
    starts: an $HPC_RAY_TMP that is not a folder, that others may write to without the sticky bit (they could rename
    this folder away: /tmp itself is fine), or that is too long for Ray's socket paths."""
    base = Path(os.environ.get("HPC_RAY_TMP") or "/tmp")
    prefix = f"ray-{job_id}-r{restart_count}-"  # no role (head, a node's name): Ray's socket paths must stay short
    try:
        st = base.stat()
    except OSError as exc:
        raise UserError(f"HPC_RAY_TMP {base} cannot be used ({exc.strerror}); set it to a node-local folder such as "
                        "/tmp") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"HPC_RAY_TMP {base} is not a folder; set it to a node-local folder such as /tmp")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UserError(f"HPC_RAY_TMP {base} can be written by other users and has no sticky bit, so they could "
                        f"move this job's Ray folder away; use /tmp, or a folder only you can write "
                        f"(chmod go-w {base})")
    if len(str(base / prefix)) + MKDTEMP_CHARS + len(f"/{RAY_DIR}") + SESSION_SUFFIX > SOCKET_PATH_MAX:
        raise UserError(f"Ray temp dir {base / prefix}... is too long for Ray's socket paths (max {SOCKET_PATH_MAX} "
                        "bytes in all); set HPC_RAY_TMP to a short node-local folder such as /tmp")
    _remove_earlier_runs(base, job_id, restart_count)
    try:
        root = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        (root / RAY_DIR).mkdir()
        return root / RAY_DIR
    except OSError as exc:
        raise UserError(f"cannot make Ray's temp dir in HPC_RAY_TMP {base} ({exc.strerror}); set HPC_RAY_TMP to a "
                        "node-local folder you can write, such as /tmp") from None


def remove_temp_dir(tmp: Path, timeout: float = 10.0) -> None:
    """A node's Ray temp dir (temp_dir's), with the private root it sits in, once its `ray start` has stopped.

    Some of the node's Ray processes can outlive its `ray start`. A Ray worker that the raylet spawned just before it
    stopped initialises afterwards, and every Ray process makes its temp and session folders when it starts
    (`Node._init_temp`, os.makedirs): one remade the whole tree, root 0755 and Ray's folder 0777, 1 s after it was
    removed (a Slurm test, once in the suite). So this node's processes still named by `tmp` in their command line
    (Ray passes every process its temp dir or its sockets) are SIGKILLed first. Ray's Prometheus service-discovery
    writer (a thread of a dashboard module, every 5 s) is not named so, and once made a file in the session folder
    while rmtree emptied it; with the session folder gone its writes fail (it makes no folders), so a second pass
    removes what is left."""
    deadline = time.monotonic() + timeout
    name = str(tmp).encode()
    left = _kill_processes_naming(name)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [pid for pid in left if name in _cmdline(pid)]  # gone, or a zombie (no command line)
    root = tmp.parent
    shutil.rmtree(root, ignore_errors=True)
    while os.path.lexists(root) and time.monotonic() < deadline:
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _kill_processes_naming(name: bytes) -> list[int]:
    """SIGKILL this user's processes (not this one) whose command line holds `name`; their PIDs."""
    killed = []
    try:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return killed
    for pid in pids:
        if pid == os.getpid() or name not in _cmdline(pid):
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == os.getuid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except OSError:  # ended meanwhile
            continue
    return killed


def _remove_earlier_runs(base: Path, job_id: str, restart_count: int) -> None:
    """The temp dirs of this job's earlier runs on this node (a requeue's processes are all gone before it starts
    again), and only those: this user's own 0700 folders, never followed through a link."""
    earlier = re.compile(rf"ray-{re.escape(job_id)}-r(\d+)-[^/]{{{MKDTEMP_CHARS}}}")
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        found = earlier.fullmatch(entry.name)
        if not found or int(found.group(1)) >= restart_count:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700:
            shutil.rmtree(entry.path, ignore_errors=True)
            log(f"removed {entry.path}: run {found.group(1)} of this job was stopped before its teardown")


def ray_env(token_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               # A node is stopped only after the driver has ended: there is nothing in flight to drain (the
               # 30 s default is for Ray Serve), and Slurm SIGKILLs what is still running after KillWait.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5")
    return env


def _ignore_job_signals() -> None:
    """In Ray's processes and the driver: Slurm's --signal without B: (submitit's USR2 before the time limit)
    and `scancel --signal` reach every process of the job, and USR1/USR2 terminate a process by default. The
    launcher handles them; ignoring them survives exec, so the children do not die of them."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def handle_stop_signals() -> None:
    """SIGTERM and SIGHUP stop the cluster like Ctrl-C (KeyboardInterrupt), so that teardown runs."""
    handle_sigterm()
    signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))


def _ignore_stop_signals() -> None:
    """Once tearing down, a second SIGTERM/SIGINT must not cut the teardown short."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def start_node(*, head: str | None, dashboard: str | None, ip: str, node: str, cpus: int, gpus: int, tmp: Path,
               log_file: Path, env: dict[str, str]) -> tuple[subprocess.Popen, dict[str, int]]:
    """`ray start --block` for this node (the head when `head` is None); it stops its own processes when it
    gets SIGTERM."""
    flags = NODE_PORTS + (HEAD_PORTS if head is None else ())
    variables = HEAD_PORT_VARS if head is None else ()
    picked_ports = free_ports(len(flags) + len(variables))
    ports, by_variable = dict(zip(flags, picked_ports)), dict(zip(variables, picked_ports[len(flags):]))
    if head is None:
        dashboard = f"http://{ip}:{ports['--dashboard-port']}"
    # Ray's state API, which Ray Train uses to clean up after trials that Tune ends, otherwise looks for
    # "the" Ray cluster on the node and fails when another job runs one there too.
    env = {**env, "RAY_API_SERVER_ADDRESS": dashboard, **{var: str(port) for var, port in by_variable.items()}}
    picked = {**{flag.strip("-"): port for flag, port in ports.items()},
              **{var.lower().replace("_", "-"): port for var, port in by_variable.items()}}
    argv = [ray_executable(), "start", "--block", "--node-ip-address", ip, "--num-cpus", str(cpus),
            "--num-gpus", str(gpus), "--temp-dir", str(tmp), "--disable-usage-stats",
            "--labels", f"{NODE_LABEL}={node}",  # the Slurm node name; nodes may share an IP
            # 0: each Ray worker process binds a port the kernel picks, never a fixed range shared by jobs
            "--min-worker-port", "0", "--max-worker-port", "0"]
    if head is None:
        # The node's own address, as every other port: not every interface of the node (its users reach it by
        # the SSH tunnel that the job log prints).
        argv += ["--head", "--include-dashboard", "true", "--dashboard-host", ip]
    else:
        argv += ["--address", head]
    for flag, port in ports.items():
        argv += [flag, str(port)]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_ignore_job_signals)
    return proc, picked


def check_token_auth(dashboard: Dashboard) -> None:
    """What the job log's "token auth on" says, asked of the running head: its mode is token, and a request without
    the token is refused (401). A Ray without token authentication (before 2.52) would otherwise serve anyone."""
    try:
        mode = dashboard.get("/api/authentication_mode").get("authentication_mode")
    except (DashboardError, AttributeError) as exc:
        mode = f"unknown: {exc}"
    try:
        Dashboard(dashboard.url).version()
        tokenless = "HTTP 200"
    except DashboardError as exc:
        tokenless = f"HTTP {exc.status}" if exc.status else str(exc)
    if mode != "token" or tokenless != "HTTP 401":
        raise UserError(f"the Ray head at {dashboard.url} does not enforce its token (authentication mode {mode}; a "
                        f"request without the token got {tokenless}, not HTTP 401); stopping, since anyone on the "
                        "network could run code on this job's cluster: install ray>=2.60 "
                        "(pip install -U 'ray[default]')")


class NodeExited(UserError):
    """A Ray node (or the srun step of the workers) exited while the cluster was starting or waiting."""


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def failure_line(text: str) -> str:
    """The line of a failed `ray start`'s output that says why (its last error), shortened for a log line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "Exception" in ln or "failed" in ln.lower()]
    line = (errors or lines or ["no output"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def stop(proc: subprocess.Popen | None, grace: float, what: str) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        log(f"{what} still running {grace:.0f} s after SIGTERM; killing it")
        proc.kill()
        return proc.wait()


def new_token(job_dir: Path) -> Path:
    """The job's token, in its job folder (made 0700: the token, cluster.json and the Ray logs are the job's alone).
    A job folder that is a link, or another user's (planted at the job's predictable name under a shared
    HPC_JOBS_DIR), is refused: they could read the token."""
    job_dir.mkdir(parents=True, exist_ok=True)
    st = os.lstat(job_dir)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        why = "a link" if stat.S_ISLNK(st.st_mode) else f"owned by uid {st.st_uid}"
        raise UserError(f"job folder {job_dir} is {why}, made by someone else: they could read this job's token; "
                        "set HPC_JOBS_DIR to a folder only you can write (default ~/.hpc-ray/jobs)")
    os.chmod(job_dir, 0o700)
    path = job_dir / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file left by an earlier run of this job
    return path


KEEP_LOGS_CAP_MB = 1000  # per node and copy: Ray's logs of a long sweep are tens of MB; a runaway one is not kept whole
NOT_KEPT = "NOT_KEPT.txt"  # in a node's copy: what was left out, and why


def _copy_regular_files(src: Path, dest: Path, budget: int) -> tuple[int, list[str]]:
    """The regular files under `src` into `dest`, at most `budget` bytes, each at most as long as it was when opened.
    A link is never followed (a link to /dev/zero or to another user's file is not a log), nor is anything else
    that is not a regular file opened for reading (a FIFO would block). Returns the bytes copied and what was left
    out."""
    copied, left = 0, []
    for root, dirs, files in os.walk(src):  # followlinks=False: a link to a folder is listed, never entered
        rel = Path(root).relative_to(src)
        left += [f"{rel / d} (a link)" for d in sorted(dirs) if os.path.islink(os.path.join(root, d))]
        for name in sorted(files):
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:
                left.append(f"{rel / name} ({'a link' if exc.errno == errno.ELOOP else exc.strerror})")
                continue
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    left.append(f"{rel / name} (not a regular file)")
                    continue
                if copied + st.st_size > budget:
                    left.append(f"{rel / name} ({st.st_size / 1e6:.1f} MB: over the {budget / 1e6:.0f} MB cap)")
                    continue
                (dest / rel).mkdir(parents=True, exist_ok=True)
                with open(dest / rel / name, "wb") as out:
                    remaining = st.st_size
                    while remaining > 0 and (chunk := fh.read(min(1 << 20, remaining))):
                        out.write(chunk)
                        remaining -= len(chunk)
                        copied += len(chunk)
    return copied, left


def keep_logs(tmp: Path, job_dir: Path, node: str, restart_count: int, so_far: bool = False) -> None:
    """Copy this node's Ray session logs (raylet, GCS, dashboard, each worker's stdout and stderr) from its temp
    dir, which teardown removes, into the job folder: LOGS_DIR/<node> (<node>-restart<n> after a requeue). Regular
    files only, never through a link, at most KEEP_LOGS_CAP_MB; what was left out is listed in NOT_KEPT there."""
    dest = job_dir / LOGS_DIR / (node if not restart_count else f"{node}-restart{restart_count}")
    sessions = sorted(p for p in tmp.glob("session_*") if p.is_dir() and not p.is_symlink() and (p / "logs").is_dir()
                      and not (p / "logs").is_symlink())
    if not sessions:
        return
    budget, left = KEEP_LOGS_CAP_MB * 10**6, []
    try:
        for session in sessions:  # one per `ray start` attempt
            target = dest / session.name if len(sessions) > 1 else dest
            copied, skipped = _copy_regular_files(session / "logs", target, budget)
            budget -= copied
            left += [f"{session.name}/{item}" if len(sessions) > 1 else item for item in skipped]
        (dest / NOT_KEPT).unlink(missing_ok=True)
        if left:
            (dest / NOT_KEPT).write_text(f"Not copied from {tmp} (regular files only, never through a link, at most "
                                         f"{KEEP_LOGS_CAP_MB} MB; hpc.ray_cluster.keep_logs):\n"
                                         + "\n".join(left) + "\n")
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file() and f.name != NOT_KEPT)
    except OSError as exc:  # a full or read-only job folder must not stop the teardown
        log(f"could not keep {node}'s Ray logs in {dest}: {exc}")
        return
    note = f"; {len(left)} left out, listed in {dest / NOT_KEPT}" if left else ""
    log(f"{node}'s Ray logs{' (so far)' if so_far else ''} kept in {dest} ({size / 1e6:.1f} MB){note}")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


class Cluster:
    """The head side: start, wait for nodes, run the driver, tear down."""

    def __init__(self, alloc: Allocation, spawn_workers: bool, join_timeout: float, driver_only: bool = False,
                 worker_jobs: "WorkerJobs | None" = None):
        self.alloc = alloc
        self.driver_only = driver_only  # a small head: the driver only, every trial on the join jobs' nodes
        self.worker_jobs = worker_jobs
        self.spawn_workers = spawn_workers
        self.join_timeout = join_timeout
        self.job_dir = alloc.job_dir
        self.head: subprocess.Popen | None = None
        self.workers: subprocess.Popen | None = None
        self.driver: subprocess.Popen | None = None
        self.tmp = temp_dir(alloc.job_id, alloc.restart_count)
        self.info: dict = {}

    def start(self) -> None:
        t0 = time.monotonic()
        (self.job_dir / CLUSTER_FILE).unlink(missing_ok=True)  # an earlier run of a requeued job
        token_file = new_token(self.job_dir)
        self.env = ray_env(token_file)
        ip = node_ip(self.alloc.this_node)
        cpus, gpus = (0, 0) if self.driver_only else (cpus_on_node(), gpus_on_node())
        head_log = self.job_dir / "ray-head.log"
        log(f"job {self.alloc.job_id}: starting the Ray head on {self.alloc.this_node} ({ip}): {cpus} CPUs, "
            f"{gpus} GPUs; logs in {self.job_dir}")
        for attempt in range(1, START_ATTEMPTS + 1):
            offset = log_size(head_log)
            self.head, ports = start_node(head=None, dashboard=None, ip=ip, node=self.alloc.this_node, cpus=cpus,
                                          gpus=gpus, tmp=self.tmp, log_file=head_log, env=self.env)
            self.dashboard = Dashboard(f"http://{ip}:{ports['dashboard-port']}", token_file.read_text().strip())
            try:
                self._wait(lambda: STARTED in log_since(head_log, offset) and self._dashboard_up(), 120,
                           "the Ray head", head_log)
                break
            except NodeExited:
                if attempt == START_ATTEMPTS:
                    raise
                log(f"the Ray head failed to start ({failure_line(log_since(head_log, offset))}); retrying with "
                    f"new ports (attempt {attempt + 1} of {START_ATTEMPTS})")
        address = f"{ip}:{ports['port']}"
        self.info = {"job_id": self.alloc.job_id, "restart_count": self.alloc.restart_count, "state": "starting",
                     "head_node": self.alloc.this_node, "head_ip": ip, "address": address,
                     "dashboard_url": self.dashboard.url, "token_file": str(token_file), "ports": ports,
                     "nodes": self.alloc.nodes, "pid": os.getpid()}
        write_json(self.job_dir / CLUSTER_FILE, self.info)
        others = [n for n in self.alloc.nodes if n != self.alloc.this_node]
        if others and self.spawn_workers:
            self.workers = subprocess.Popen(
                ["srun", f"--job-name={WORKER_STEP}", f"--nodes={len(others)}", f"--ntasks={len(others)}",
                 "--ntasks-per-node=1", f"--nodelist={','.join(others)}", "--kill-on-bad-exit=1",
                 sys.executable, "-m", "hpc.ray_cluster", "worker", "--head", address,
                 "--dashboard", self.dashboard.url, "--job-dir", str(self.job_dir)],
                env=self.env, stdin=subprocess.DEVNULL)
        want = len(self.alloc.nodes)
        self._wait(lambda: len(self.dashboard.alive_nodes()) >= want, self.join_timeout,
                   f"all {want} nodes to join", self.job_dir / "ray-worker-*.log")
        check_token_auth(self.dashboard)
        nodes = self.dashboard.alive_nodes()
        total = {k: sum(n.get("resources_total", {}).get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
        self.info.update(state="running", cpus=total["CPU"], gpus=total["GPU"])
        write_json(self.job_dir / CLUSTER_FILE, self.info)
        url = self.dashboard.url
        port = url.rsplit(":", 1)[1]
        log(f"Ray cluster up in {time.monotonic() - t0:.1f} s: {len(nodes)} nodes ({', '.join(self.alloc.nodes)}), "
            f"{total['CPU']:g} CPUs, {total['GPU']:g} GPUs; token auth on")
        log(f"address   {address}")
        log(f"dashboard {url}  (token: {token_file})")
        log(f"tunnel    ssh -N -L 8265:{ip}:{port} <login node>   then open http://localhost:8265 "
            "and paste the token")
        log(f"status    python -m hpc.status {self.alloc.job_id}")
        if self.driver_only:
            log("driver only: this node runs no trial; nodes join with python -m hpc.join (sbatch slurm/join.sh OUT)")
        if self.worker_jobs:
            self.worker_jobs.submit(self.job_dir)

    def _dashboard_up(self) -> bool:
        try:
            self.dashboard.version()
            return True
        except DashboardError:
            return False

    def _wait(self, cond, timeout: float, what: str, logs) -> None:
        end = time.monotonic() + timeout
        while True:
            for name, proc in (("Ray head", self.head), ("Ray worker step", self.workers)):
                if proc is not None and proc.poll() is not None:
                    raise NodeExited(f"{name} exited ({proc.returncode}) while waiting for {what}; see {logs}")
            try:
                if cond():
                    return
            except DashboardError:
                pass
            if time.monotonic() > end:
                raise UserError(f"timed out after {timeout:.0f} s waiting for {what}; see {logs} "
                                "(raise --join-timeout if nodes are slow to start)")
            time.sleep(0.5)

    def run(self, cmd: list[str]) -> int:
        # HPC_JOB_DIR and HPC_DASHBOARD: what a driver publishes for join jobs (python -m hpc.join; the token stays
        # in the job folder and is found through RAY_AUTH_TOKEN_PATH).
        env = {**self.env, "RAY_ADDRESS": self.info["address"], "HPC_JOB_DIR": str(self.job_dir),
               "HPC_DASHBOARD": self.dashboard.url}
        log(f"running   {' '.join(cmd)}")
        self.driver = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_job_signals)
        return self.driver.wait()

    def teardown(self, interrupted: bool) -> None:
        _ignore_stop_signals()
        if self.info:
            self.info["state"] = "stopping"
            write_json(self.job_dir / CLUSTER_FILE, self.info)
        # Slurm SIGKILLs a requeued or cancelled job KillWait seconds after its SIGTERM, which can fall before the
        # driver and the head have stopped (measured: the two-node requeue test lost the head's logs, twice): a copy
        # first, of what the run wrote, and the whole of them again once the head has stopped.
        keep_logs(self.tmp, self.job_dir, self.alloc.this_node, self.alloc.restart_count, so_far=True)
        if self.driver is not None and self.driver.poll() is None:
            log("stopping the driver")
            stop(self.driver, 60, "the driver")
        if self.worker_jobs:
            self.worker_jobs.cancel()
        if self.workers is not None and self.workers.poll() is None:
            signal_step(self.alloc.job_id, WORKER_STEP, "TERM")  # srun exits after its tasks
            try:
                self.workers.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                stop(self.workers, 10, "the Ray worker step")
        if self.head is not None:
            stop(self.head, STOP_GRACE_S, "the Ray head")
        keep_logs(self.tmp, self.job_dir, self.alloc.this_node, self.alloc.restart_count)
        remove_temp_dir(self.tmp)
        if self.info:
            self.info["state"] = "interrupted" if interrupted else "ended"
            write_json(self.job_dir / CLUSTER_FILE, self.info)
        log("Ray cluster stopped")


class WorkerJobs:
    """Join jobs that this job submits once its cluster is up (--worker-jobs N), and cancels when it ends: queued
    or running, none of them then holds an allocation for a sweep that is over."""

    def __init__(self, count: int, cpus: int | None, gpus: int | None, time_limit: str | None):
        self.count, self.cpus, self.gpus, self.time_limit = count, cpus, gpus, time_limit
        self.ids: list[str] = []

    def submit(self, job_dir: Path) -> None:
        cpus = self.cpus or cpus_on_node()
        gpus = gpus_on_node() if self.gpus is None else self.gpus
        argv = ["sbatch", "--parsable", f"--job-name=join-{os.environ.get('SLURM_JOB_ID')}", "--nodes=1",
                "--ntasks-per-node=1", f"--cpus-per-task={cpus}", "--signal=B:USR1@60",
                f"--output={job_dir}/join-%j.out", f"--array=1-{self.count}" if self.count > 1 else "--array=1"]
        if gpus:
            argv.append(f"--gpus-per-node={gpus}")
        if self.time_limit:
            argv.append(f"--time={self.time_limit}")
        argv += ["--wrap", f"exec {sys.executable} -m hpc.join {job_dir}"]
        proc = subprocess.run(argv, capture_output=True, text=True, env=_without_slurm_job_env())
        if proc.returncode:
            log(f"could not submit the {self.count} worker job(s): {proc.stderr.strip()}")
            return
        self.ids.append(proc.stdout.strip().split(";")[0])
        log(f"worker jobs: array {self.ids[0]} of {self.count} join job(s), {cpus} CPUs and {gpus} GPUs each; "
            "cancelled when this job ends")

    def cancel(self) -> None:
        for job in self.ids:
            subprocess.run(["scancel", job], capture_output=True)
            log(f"worker jobs {job} cancelled (this job has ended)")
        self.ids = []


def _without_slurm_job_env() -> dict[str, str]:
    """sbatch from inside a job would inherit its SLURM_* settings (node list, CPUs, job name) as defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}


def run_on_cluster(cmd: list[str], spawn_workers: bool = True, join_timeout: float = 300, driver_only: bool = False,
                   worker_jobs: WorkerJobs | None = None) -> int:
    """Start the cluster, run cmd, tear down; returns cmd's exit status (130 when interrupted)."""
    if not cmd:
        raise UserError("no command given: python -m hpc.ray_cluster -- python -m cifarray.tune ...")
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        raise UserError(f"command not found: {cmd[0]}")
    alloc = Allocation.from_env()
    cluster = Cluster(alloc, spawn_workers, join_timeout, driver_only, worker_jobs)
    interrupted = False
    try:
        cluster.start()
        code = cluster.run(cmd)
        log(f"driver exited with status {code}")
        return code
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted (SIGTERM/SIGINT): tearing down")
        return INTERRUPTED
    finally:
        cluster.teardown(interrupted)


def join_cluster(job_dir: Path, head: str | None, dashboard: str | None, timeout: float = 300) -> int:
    """A worker node: join the head (given, or found in the job's cluster.json), block until signalled."""
    alloc = Allocation.from_env()
    end = time.monotonic() + timeout
    while head is None:
        try:
            info = json.loads((job_dir / CLUSTER_FILE).read_text())
            if info.get("restart_count") == alloc.restart_count and info.get("state") == "starting":
                head, dashboard = info["address"], info["dashboard_url"]
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > end:
            raise UserError(f"no Ray head of job {alloc.job_id} appeared in {job_dir / CLUSTER_FILE} "
                            f"within {timeout:.0f} s")
        time.sleep(0.5)
    tmp = temp_dir(alloc.job_id, alloc.restart_count)
    log_file = job_dir / f"ray-worker-{alloc.this_node}.log"
    proc = None
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            offset = log_size(log_file)
            proc, _ = start_node(head=head, dashboard=dashboard, ip=node_ip(alloc.this_node), node=alloc.this_node,
                                 cpus=cpus_on_node(), gpus=gpus_on_node(), tmp=tmp,
                                 env=ray_env(job_dir / TOKEN_FILE), log_file=log_file)
            while True:
                try:
                    code = proc.wait(2)
                except subprocess.TimeoutExpired:
                    code = None
                # Under submitit nobody signals this task: it leaves when the head announces the end.
                if _head_stopping(job_dir, alloc.restart_count):
                    return 0
                if code is not None:
                    break
            output = log_since(log_file, offset)
            if code == 0 or STARTED in output or attempt == START_ATTEMPTS:
                return code
            log(f"the Ray worker on {alloc.this_node} failed to start ({failure_line(output)}); retrying with new "
                f"ports (attempt {attempt + 1} of {START_ATTEMPTS})")
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        _ignore_stop_signals()
        stop(proc, STOP_GRACE_S, "the Ray worker")
        keep_logs(tmp, job_dir, alloc.this_node, alloc.restart_count)
        remove_temp_dir(tmp)


def _head_stopping(job_dir: Path, restart_count: int) -> bool:
    try:
        info = json.loads((job_dir / CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return info.get("restart_count") == restart_count and info.get("state") in ("stopping", "ended", "interrupted")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpc.ray_cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--join-timeout", type=float, default=300, help="seconds to wait for every node (default 300)")
    p.add_argument("--driver-only", action="store_true",
                   help="a small head: this job's first node runs the driver and no trial (0 CPUs, 0 GPUs for Ray); "
                   "trials run on the job's other nodes and on join jobs")
    p.add_argument("--worker-jobs", type=int, default=0,
                   help="submit N join jobs (a job array) once the cluster is up; cancelled when this job ends")
    p.add_argument("--worker-cpus", type=int, help="CPUs per worker job (default: this job's per node)")
    p.add_argument("--worker-gpus", type=int, help="GPUs per worker job (default: this job's per node)")
    p.add_argument("--worker-time", help="time limit per worker job (default: the partition's)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the driver command")
    return p


def requeue_self(signum, frame) -> None:
    """SIGUSR1 (sbatch --signal=B:USR1@SECONDS): the time limit is near. Requeue the job; Slurm then
    SIGTERMs it, the cluster is torn down, and the requeued job continues from its output folder."""
    job = os.environ.get("SLURM_JOB_ID")
    log(f"time limit near (SIGUSR1): requeueing job {job}")
    proc = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
    if proc.returncode:
        log(f"scontrol requeue {job} failed: {proc.stderr.strip()}; the job will end at its time limit")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    handle_stop_signals()
    signal.signal(signal.SIGUSR1, requeue_self)
    if argv[:1] == ["worker"]:
        w = argparse.ArgumentParser(prog="python -m hpc.ray_cluster worker")
        w.add_argument("--head")
        w.add_argument("--dashboard")
        w.add_argument("--job-dir", required=True)
        args = w.parse_args(argv[1:])
        code = join_cluster(Path(args.job_dir), args.head, args.dashboard)
        return 0 if code == INTERRUPTED else code  # the head stops its srun'ed workers with SIGTERM
    args = parser().parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.worker_jobs < 0:
        raise UserError("--worker-jobs must be >= 0")
    jobs = WorkerJobs(args.worker_jobs, args.worker_cpus, args.worker_gpus, args.worker_time) if args.worker_jobs else None
    return run_on_cluster(cmd, join_timeout=args.join_timeout, driver_only=args.driver_only, worker_jobs=jobs)


if __name__ == "__main__":
    run_cli(main)
