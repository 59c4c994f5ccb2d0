"""What a Slurm allocation gives this process: job id, nodes, CPUs and GPUs per node, node addresses."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hpc.errors import UserError


def jobs_root() -> Path:
    """Per-job folders (cluster.json, token, Ray logs). In $HOME by default: shared by the nodes of an
    HPC cluster, private to the user."""
    return Path(os.environ.get("HPC_JOBS_DIR") or Path.home() / ".hpc-ray" / "jobs").expanduser()


def scontrol(*args: str) -> str:
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError("scontrol not found: run this inside a Slurm job on a node with the Slurm client") from None
    if proc.returncode:
        raise UserError(f"scontrol {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def gpus_on_node(env: dict[str, str] | os._Environ = os.environ) -> int:
    """GPUs Slurm gave this job on this node. SLURM_GPUS_ON_NODE is set for --gpus*, and --gres=gpu:N
    requests alike (SLURM_GPUS_PER_TASK is empty for --gres); older Slurm only sets SLURM_JOB_GPUS."""
    if env.get("SLURM_GPUS_ON_NODE", "").strip():
        return int(env["SLURM_GPUS_ON_NODE"])
    ids = env.get("SLURM_JOB_GPUS", "").strip()
    return len([i for i in ids.split(",") if i]) if ids else 0


def cpus_on_node(env: dict[str, str] | os._Environ = os.environ) -> int:
    value = env.get("SLURM_CPUS_ON_NODE", "").strip()
    return int(value) if value else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: list[str]
    this_node: str
    restart_count: int

    @classmethod
    def from_env(cls) -> "Allocation":
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            raise UserError("not inside a Slurm job (SLURM_JOB_ID is unset): submit with sbatch or "
                            "python -m hpc.submit, or use python -m hpc.submit --executor local")
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or socket.gethostname()
        nodes = scontrol("show", "hostnames", nodelist).split() if any(c in nodelist for c in "[,") else [nodelist]
        this = os.environ.get("SLURMD_NODENAME") or nodes[0]
        return cls(job_id, nodes, this, int(os.environ.get("SLURM_RESTART_COUNT") or 0))

    @property
    def job_dir(self) -> Path:
        return jobs_root() / self.job_id


def signal_step(job_id: str, step_name: str, signame: str) -> None:
    """Signal the tasks of this job's step named `step_name` (scancel --signal=NAME JOB.STEP), not srun itself:
    SIGTERM to srun makes it SIGKILL its tasks, which then cannot stop their Ray nodes or leave drained."""
    steps = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i %j"],
                           capture_output=True, text=True).stdout.split("\n")
    for line in steps:
        if line.endswith(" " + step_name):
            subprocess.run(["scancel", f"--signal={signame}", line.split()[0]], capture_output=True)


def node_ip(node: str | None) -> str:
    """The address other nodes reach `node` at: Slurm's NodeAddr, resolved. A loopback address (single-host
    test clusters) is replaced by this host's outward address, as Ray itself would do."""
    addr = None
    if node:
        try:
            for field in scontrol("show", "node", node).split():
                if field.startswith("NodeAddr="):
                    addr = field.split("=", 1)[1]
        except UserError:
            addr = None
    ip = socket.gethostbyname(addr or socket.gethostname())
    if ip.startswith("127.") or ip == "::1":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("192.0.2.1", 9))  # no packet is sent: this only asks the kernel for the route
                ip = s.getsockname()[0]
            except OSError:
                pass
    return ip
