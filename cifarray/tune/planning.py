"""How a sweep uses its Ray cluster: workers per trial, how many trials
run at once, and how that number follows the live cluster as nodes join, drain and leave.

The resources of one trial are fixed when the sweep starts (`plan_on_cluster`): a restored trial keeps them, and
Tune cannot change a trainable's request mid-sweep. How many trials run at once is not: `Live.concurrent` works it
out again from the nodes that are alive and not draining (the sweep's limiter asks it, `cifarray.tune.searcher`),
so a sweep grows onto nodes that join and shrinks when they leave, never past `--max-concurrent`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from cifarray.errors import UserError

WAIT_LINE_S = 60  # how often a sweep with nowhere to run a trial says so again


def trial_workers(gpus_per_trial: float, workers_per_trial: int | None) -> int:
    """DDP workers per trial, checked against --gpus-per-trial (whole GPUs, one per worker, or a fraction
    of one GPU for a one-worker trial)."""
    g = gpus_per_trial
    if g < 0:
        raise UserError("--gpus-per-trial must be >= 0")
    workers = workers_per_trial or max(1, int(g))
    if 0 < g < 1:
        if workers > 1:
            raise UserError(f"--gpus-per-trial {g:g} with --workers-per-trial {workers}: a fraction of a GPU is for "
                            "one-worker trials (NCCL refuses two ranks on one GPU); pass --workers-per-trial 1, or "
                            f"--gpus-per-trial {workers} (one GPU per worker)")
    elif g and (g != int(g) or g != workers):
        raise UserError(f"--gpus-per-trial {g:g} must equal --workers-per-trial {workers} (one GPU per DDP "
                        "worker), or be a fraction <= 1 for one-worker trials")
    return workers


def plan(cpus: int, gpus: float, gpus_per_trial: float, workers: int, cpus_per_trial: int | None,
         max_concurrent: int | None, trials: int) -> tuple[int, int]:
    """(trials at once, CPUs per worker) on a cluster of `cpus` and `gpus`.

    With GPUs, concurrency follows GPUs / GPUs per trial (0.25: four trials per GPU) and the CPUs are
    shared out among the trials that fit; without, each worker gets --cpus-per-trial / workers CPUs.
    """
    if gpus_per_trial:
        if gpus < gpus_per_trial:
            raise UserError(f"--gpus-per-trial {gpus_per_trial:g} but the Ray cluster has {gpus:g} GPU(s); "
                            "lower it or run on GPU nodes")
        # A fraction packs per GPU: floor(1 / f) trials on each (0.3: 3 per GPU, 24 on 8 GPUs, not 26: a trial
        # lives on one GPU, so the totals' remainder cannot hold one; ray-project/ray#5902).
        per_gpu = int(1 / gpus_per_trial + 1e-9) if gpus_per_trial < 1 else 0
        fit_by = per_gpu * int(gpus + 1e-9) if per_gpu else int(gpus / gpus_per_trial + 1e-9)
        cpus_per_worker = max(1, (cpus_per_trial or cpus // fit_by) // workers)
        fit_by = min(fit_by, cpus // (cpus_per_worker * workers))  # every trial still needs its CPUs
    else:
        cpus_per_worker = max(1, (cpus_per_trial or workers) // workers)
        fit_by = cpus // (cpus_per_worker * workers)
    if fit_by < 1:
        raise UserError(f"one trial needs {workers * cpus_per_worker} CPUs but the Ray cluster has {cpus}; "
                        "lower --workers-per-trial or --cpus-per-trial")
    return min(fit_by, max_concurrent or fit_by, trials), cpus_per_worker


@dataclass(frozen=True)
class Plan:
    """How the sweep uses the Ray cluster it joined."""

    concurrent: int  # trials at once when the sweep started (then: Live.concurrent)
    cpus_per_worker: int
    gpus_per_trial: float


def plan_on_cluster(args) -> Plan:
    """Join (or start) the Ray cluster and size the sweep to it; refuse a trial it can never hold.

    A cluster with no CPU for trials yet (a small head that runs only the driver, `hpc.ray_cluster --driver-only`)
    is waited on, one line at a time, until a node joins: the first node that joins sizes the trials."""
    import ray

    from cifarray.train import cluster

    cluster.init_ray()
    res = wait_for_trial_nodes(args.out)
    cpus, gpus = int(res.get("CPU", 1)), float(res.get("GPU", 0))
    gpus_per_trial = 1.0 if args.auto_gpus and gpus and args.workers == 1 else args.gpus_per_trial
    concurrent, cpus_per_worker = plan(cpus, gpus, gpus_per_trial, args.workers, args.cpus_per_trial,
                                       args.max_concurrent, args.n_trials)
    # Totals can hold a trial whose workers no single node holds; Tune would wait for it without end.
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if cluster.workers_that_fit(nodes, cpus_per_worker, gpus_per_trial / args.workers) < args.workers:
        gpu = f" and {gpus_per_trial / args.workers:g} GPU" if gpus_per_trial else ""
        raise UserError(f"a trial's {args.workers} worker(s) with {cpus_per_worker} CPU(s){gpu} each do not fit this "
                        f"Ray cluster's nodes ({cluster.describe_cluster(nodes)}): a worker runs on one node; lower "
                        "--cpus-per-trial, or raise --workers-per-trial to spread a trial over nodes")
    return Plan(concurrent, cpus_per_worker, gpus_per_trial)


def wait_for_trial_nodes(out) -> dict:
    """The cluster's resources once some node offers a CPU (at once, unless only a driver-only head is up)."""
    import ray

    said = 0.0
    while True:
        res = ray.cluster_resources()
        if res.get("CPU", 0) >= 1:
            return res
        if time.monotonic() - said > WAIT_LINE_S:
            said = time.monotonic()
            print(f"waiting for a node to run trials on (this cluster's nodes offer no CPU): join one with "
                  f"sbatch slurm/join.sh {out}", flush=True)
        time.sleep(1)


class Live:
    """Trials at once on the live cluster: what fits on the nodes that are alive and not draining, at least one,
    at most --max-concurrent and the sweep's trials. Asked often; the GCS is read at most every `every` s."""

    def __init__(self, plan: Plan, workers: int, max_concurrent: int | None, trials: int, every: float = 2.0):
        self.plan, self.workers, self.cap, self.trials, self.every = plan, workers, max_concurrent, trials, every
        self.value, self._at = plan.concurrent, 0.0

    def concurrent(self) -> int:
        now = time.monotonic()
        if now - self._at >= self.every:
            self._at = now
            try:
                self.value = self.compute(trial_nodes())
            except Exception as exc:  # a GCS hiccup: keep the last value
                print(f"note: could not read the Ray cluster's nodes ({exc}); keeping {self.value} trial(s) at once",
                      file=sys.stderr)
        return self.value

    def compute(self, nodes: list[dict]) -> int:
        from cifarray.train.cluster import workers_that_fit

        fit = workers_that_fit(nodes, self.plan.cpus_per_worker, self.plan.gpus_per_trial / self.workers)
        fit //= self.workers
        return max(1, min(fit, self.cap or fit, self.trials))


def trial_nodes() -> list[dict]:
    """Each node that can take new trials: alive and not draining (its total resources)."""
    import ray
    from ray._private.state import state  # the GCS's draining nodes, as Ray Data reads them

    draining = state.get_draining_nodes()
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in draining]
