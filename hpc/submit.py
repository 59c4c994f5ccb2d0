"""python -m hpc.submit [options] -- CMD ...: CMD on a per-job Ray cluster, submitted with submitit.

    python -m hpc.submit --nodes 2 --gpus-per-node 4 --time 240 -- \\
        python -m cifarray.tune --sweep sweeps/densenet_100k.toml --data-dir ~/data --out runs/tune --resume=auto
    python -m hpc.submit --executor local -- python -m cifarray.train densenet --synthetic --steps 300
    python -m hpc.submit --no-wait join runs/tune          # one more node for the sweep running in runs/tune

Every task of the job starts a Ray node (task 0 the head, with the dashboard and token auth, see
hpc.ray_cluster); CMD runs on task 0 once all nodes joined. The job is checkpointable: on preemption or
near its time limit submitit requeues it and CMD runs again, so CMD should continue from its own output
folder (cifarray.train always does; give cifarray.tune --resume=auto). This command waits for the job and
exits with CMD's status (--no-wait: print the job id and return).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from hpc.errors import UserError, run_cli
from hpc.job import RayJob
from hpc.unpickle import fixed_part, writable_by_others

DEFAULT_CPUS = 8  # what the slurm/*.sh scripts ask per node (#SBATCH --cpus-per-task=8)
# submitit's command on the node, through hpc.unpickle: the job's folder is checked there before its pickle is read
GUARDED_PYTHON = f"{shlex.quote(sys.executable)} -m hpc.unpickle"
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "FINISHED", "INTERRUPTED")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpc.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1, help="Slurm nodes, one Ray node each (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    p.add_argument("--cpus-per-node", type=int, default=None,
                   help=f"CPUs per node (default {DEFAULT_CPUS}, as the slurm/*.sh scripts ask; all of them with "
                   "--exclusive). Without -c Slurm gives a task one CPU, and Ray then plans one trial at a time")
    p.add_argument("--exclusive", action="store_true", help="the whole nodes: every CPU (and GPU) of each")
    p.add_argument("--mem-per-cpu", help="memory per CPU, e.g. 4G (default: the cluster's)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--time", type=int, default=60, help="time limit in minutes (default 60)")
    p.add_argument("--name", default="cifarray", help="job name (default cifarray)")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                   help="slurm: sbatch through submitit; local: this machine, no Slurm (default slurm)")
    p.add_argument("--folder", default="runs/submitit/%j", help="submitit's logs and pickles (default %(default)s)")
    p.add_argument("--join-timeout", type=float, default=300, help="seconds to wait for all Ray nodes")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--worker-jobs", type=int, default=0,
                   help="once the cluster is up, submit N join jobs (sbatch slurm/join.sh), cancelled when it ends")
    p.add_argument("--driver-only", action="store_true", help="task 0 runs the driver and no trial (a small head)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run on the Ray cluster")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    joining = "join" in argv and "--" not in argv[:argv.index("join")]
    if joining:  # python -m hpc.submit [options] join OUT
        at = argv.index("join")
        if len(argv) != at + 2:
            raise UserError("usage: python -m hpc.submit [options] join OUT (the sweep's folder)")
        argv, out = argv[:at], argv[at + 1]
    args = parser().parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if joining:
        from hpc.join import read_sweep, Ended

        try:
            read_sweep(Path(out).expanduser().resolve())  # refuse here what the job would refuse
        except Ended as exc:
            print(str(exc))
            return 0
        cmd = ["join", out]
    if not cmd:
        raise UserError("no command given: python -m hpc.submit [options] -- python -m cifarray.tune ...")
    for name in ("nodes", "time"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.executor == "local" and args.nodes != 1:
        raise UserError("--executor local runs on this machine only: use --nodes 1, or --executor slurm")
    check_folder_private(args.folder)
    import submitit

    if args.executor == "slurm":
        from shutil import which

        if which("sbatch") is None:
            raise UserError("sbatch not found: run on a Slurm login node, or use --executor local")
        executor = submitit.AutoExecutor(folder=args.folder, cluster="slurm", slurm_python=GUARDED_PYTHON)
        executor.update_parameters(**slurm_parameters(args))
    else:
        executor = submitit.AutoExecutor(folder=args.folder, cluster="local", local_python=GUARDED_PYTHON)
        executor.update_parameters(timeout_min=args.time, tasks_per_node=1, nodes=1)
    if joining:
        from hpc.job import JoinJob

        job = executor.submit(JoinJob(out))
    else:
        from hpc.ray_cluster import WorkerJobs

        jobs = WorkerJobs(args.worker_jobs, args.cpus_per_node, args.gpus_per_node, None) if args.worker_jobs else None
        job = executor.submit(RayJob(cmd, args.join_timeout, args.driver_only, jobs))
    where = Path(str(job.paths.stdout)).parent
    print(f"submitted job {job.job_id} ({args.executor}, {args.nodes} node(s)); logs in {where}", flush=True)
    if args.no_wait:
        print(f"status: python -m hpc.status {job.job_id}    cancel: scancel {job.job_id}")
        return 0
    return wait(job)


def check_folder_private(folder: str) -> None:
    """submitit pickles the job into its folder, the job unpickles it on the node (hpc.unpickle checks again there),
    and its result comes back the same way: a folder that another user can write to would let them run code as this
    user. Refused in one line, before anything is written: the folder (its part before the first %), or the nearest
    part of it that exists. A sticky folder does not help: the job's folder inside it has a name anyone can predict
    (the job id)."""
    path = fixed_part(folder)
    exposed = writable_by_others(path)
    if exposed:
        raise UserError(f"--folder: {path} could have been written by another user ({exposed[1]}), and the job "
                        f"unpickles what submitit writes there; make it private (chmod go-w {path}) or pass a "
                        "--folder of your own")


def slurm_parameters(args: argparse.Namespace) -> dict:
    """submitit's parameters for the job: one task per node with the CPUs it needs (-c), GPUs, partition, memory."""
    params = dict(name=args.name, nodes=args.nodes, tasks_per_node=1, timeout_min=args.time,
                  slurm_additional_parameters={"requeue": True})
    if args.exclusive:
        params["slurm_exclusive"] = True  # Ray then counts every CPU of the node (SLURM_CPUS_ON_NODE)
        if args.cpus_per_node:
            params["cpus_per_task"] = args.cpus_per_node
    else:
        params["cpus_per_task"] = args.cpus_per_node or DEFAULT_CPUS
    if args.gpus_per_node:
        params["slurm_gpus_per_node"] = args.gpus_per_node
        cpus = params.get("cpus_per_task")
        if cpus is not None and cpus < args.gpus_per_node:
            print(f"warning: --cpus-per-node {cpus} is fewer than --gpus-per-node {args.gpus_per_node}: a GPU trial "
                  "needs a CPU to drive it, so some GPUs will idle; raise --cpus-per-node", file=sys.stderr)
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.mem_per_cpu:
        params["slurm_mem_per_cpu"] = args.mem_per_cpu
    return params


def wait(job) -> int:
    seen = None
    try:
        while True:
            state = job.state
            if state != seen:
                print(f"job {job.job_id}: {state}", flush=True)
                seen = state
            if job.done() or state.split()[0] in FINAL_STATES:
                break
            time.sleep(2)
    except KeyboardInterrupt:
        print(f"stopped waiting; job {job.job_id} goes on (scancel {job.job_id} to stop it)", file=sys.stderr)
        return 130
    state = job.state
    if state.startswith("CANCELLED"):
        print(f"job {job.job_id} was cancelled ({state}); logs in {Path(str(job.paths.stdout)).parent}",
              file=sys.stderr)
        return 1
    exposed = writable_by_others(job.paths.folder, job.paths.result_pickle)
    if exposed:  # the folder was private at submission; its result is a pickle too
        raise UserError(f"job {job.job_id}: {exposed[0]} could have been written by another user ({exposed[1]}); its "
                        f"result was not read (unpickling it could run their code): make it yours alone (chmod go-w "
                        f"{exposed[0]}) and read it with submitit yourself, or run the job again")
    try:
        code = job.results()[0]  # task 0 ran the command; the other tasks were Ray worker nodes
    except Exception as exc:  # submitit re-raises the job's failure here; its traceback is in the job log
        first = str(exc).strip().splitlines()
        reason = next((line for line in reversed(first) if line.strip()), type(exc).__name__)
        print(f"job {job.job_id} failed ({state}): {reason.strip()}; log: {job.paths.stderr}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed: command exited with status {code}", flush=True)
    return code


if __name__ == "__main__":
    run_cli(main)
