"""The callable that hpc.submit hands to submitit (its own module: submitit pickles it by import path)."""

from __future__ import annotations

import os


class RayJob:
    """The submitted callable: picklable, and checkpointable so that submitit requeues it."""

    def __init__(self, cmd: list[str], join_timeout: float, driver_only: bool = False, worker_jobs=None):
        self.cmd = cmd
        self.join_timeout = join_timeout
        self.driver_only, self.worker_jobs = driver_only, worker_jobs

    def __call__(self) -> int:
        import submitit

        from hpc import ray_cluster

        env = submitit.JobEnvironment()
        # submitit ignores SIGTERM and waits for its own signal; here SIGTERM (scancel, requeue) must stop
        # the driver and the Ray nodes at once.
        ray_cluster.handle_stop_signals()
        if os.environ.get("SLURM_JOB_ID") is None:  # local executor: a one-node "allocation" of this machine
            os.environ.update(SLURM_JOB_ID=f"local-{env.job_id}", SLURM_JOB_NODELIST="localhost")
        if env.global_rank == 0:
            code = ray_cluster.run_on_cluster(self.cmd, spawn_workers=False, join_timeout=self.join_timeout,
                                              driver_only=getattr(self, "driver_only", False),
                                              worker_jobs=getattr(self, "worker_jobs", None))
        else:
            from hpc.slurm import Allocation

            code = ray_cluster.join_cluster(Allocation.from_env().job_dir, None, None, self.join_timeout)
        if code == ray_cluster.INTERRUPTED:
            # Stopped by Slurm (requeue, preemption, scancel): leave no result, as submitit itself does when it
            # requeues, so that a waiting client follows the requeued run instead of reading this one as failed.
            raise SystemExit(code)
        if code:
            raise RuntimeError(f"{' '.join(self.cmd)} exited with status {code}")
        return code

    def checkpoint(self):
        import submitit

        print("[hpc] preempted or near the time limit: requeueing; the command continues from its output "
              "folder", flush=True)
        return submitit.helpers.DelayedSubmission(self)


class JoinJob:
    """A join job submitted with submitit (`python -m hpc.submit [--nodes N] join OUT`): its nodes join the sweep in
    OUT. It is not checkpointable: a node that leaves is drained (hpc.join) and the sweep goes on without it."""

    def __init__(self, out: str):
        self.out = out

    def __call__(self) -> int:
        from pathlib import Path

        from hpc import join

        os.environ["HPC_JOIN_TASK"] = "1"  # submitit runs this in one task a node already
        return join.join(Path(self.out).expanduser().resolve())
