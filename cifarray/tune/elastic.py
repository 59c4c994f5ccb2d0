"""A sweep whose nodes come and go: what the console says of them, and what a lost node costs a trial.

- `Nodes` follows the Ray cluster's nodes (polled from the driver every few seconds): a line when one joins,
  starts draining, or leaves, each named by its Slurm node (the `slurm-node` label hpc gives every Ray node).
- `NodeLoss` decides, when Tune retries a trial, whether its failure was its node leaving. Tune already does not
  count an actor that Ray reports as preempted (a node drained before it stopped: `hpc.join`). A node lost without
  notice (raylet killed, machine gone) is reported as an actor that died or is unavailable, and Tune counts it
  against `max_failures`: a trial could lose one node in its whole life. Such a failure is given back here (at
  most MAX_NODE_LOSSES times a trial, so that a trial that kills its own process every time still ends), while an
  error raised by the training code still spends the trial's one retry. Where the trial was is read from its own
  reports in the attempt that failed: after a restore Tune's `last_result` is the restored checkpoint's, which
  names the node of an earlier attempt (and says "drained" if that one was).
- `quiet_node_losses` keeps Tune's traceback of a lost actor out of the job log: the sweep says it in one line.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

MAX_NODE_LOSSES = 20  # per trial: lost nodes that do not count as failures
POLL_S = 2.0
# What Ray's errors say when the actor's node went away (RayActorError); an actor process killed on a node that
# lives on is a failure of the trial, as before.
LOST_MARKERS = ("ActorUnavailableError", "is unavailable", "its node has died", "node has died", "preempted")


def node_name(node: dict) -> str:
    return (node.get("Labels") or {}).get("slurm-node") or node.get("NodeManagerHostname") or node["NodeID"][:8]


class Nodes:
    """The cluster's nodes as last seen: id -> (name, CPUs, GPUs), and which are draining."""

    def __init__(self, read=None) -> None:
        self.read = read or _read_cluster  # () -> (every node as ray.nodes() gives it, ids of draining nodes)
        self.alive: dict[str, tuple[str, float, float]] = {}
        self.draining: set[str] = set()
        self.gone: dict[str, str] = {}  # id -> name of nodes that left
        self.drained: set[str] = set()  # ids of nodes that were draining: alive, or gone since
        self.addresses: dict[str, str] = {}  # id -> IP of every node seen
        self._at = 0.0

    def poll(self, force: bool = False) -> list[str]:
        """Lines for what changed since the last poll (none on the first one: the sweep's first line said it)."""
        now = time.monotonic()
        if not force and now - self._at < POLL_S:
            return []
        first, self._at = not self._at, now
        try:
            found, draining = self.read()
        except Exception:  # the GCS is briefly unreachable: try again at the next poll
            return []
        nodes = {n["NodeID"]: n for n in found}
        self.addresses.update({nid: n["NodeManagerAddress"] for nid, n in nodes.items() if n.get("NodeManagerAddress")})
        alive = {nid: (node_name(n), n.get("Resources", {}).get("CPU", 0), n.get("Resources", {}).get("GPU", 0))
                 for nid, n in nodes.items() if n.get("Alive")}
        lines = []
        if not first:
            for nid, (name, cpus, gpus) in alive.items():
                if nid not in self.alive:
                    lines.append(f"node {name} joined: {cpus:g} CPU(s), {gpus:g} GPU(s)")
            for nid in draining - self.draining:
                if nid in alive:
                    lines.append(f"node {alive[nid][0]} is draining: its trials save a checkpoint at their next step "
                                 "and continue elsewhere")
            for nid, (name, _, _) in self.alive.items():
                if nid not in alive:
                    how = "drained" if nid in self.draining else "lost"
                    lines.append(f"node {name} left ({how})")
                    self.gone[nid] = name
        if lines:
            total = sum(c for _, c, _ in alive.values()), sum(g for _, _, g in alive.values())
            lines[-1] += f"; the sweep now has {len(alive)} node(s), {total[0]:g} CPU(s), {total[1]:g} GPU(s)"
        self.alive, self.draining = alive, draining & set(alive)
        self.drained |= self.draining
        return lines

    def name(self, node_id: str | None) -> str:
        if not node_id:
            return "its node"
        if node_id in self.alive:
            return f"node {self.alive[node_id][0]}"
        return f"node {self.gone.get(node_id, node_id[:8])}"

    def name_at(self, ip: str | None) -> str:
        """The node at `ip`, where the nodes seen there all had one name (a node can join again), else 'its node'."""
        names = {self.name(nid) for nid, address in self.addresses.items() if ip and address == ip}
        return names.pop() if len(names) == 1 else "its node"


def _read_cluster() -> tuple[list[dict], set[str]]:
    import ray
    from ray._private.state import state  # the GCS's draining nodes, as Ray Data reads them

    return ray.nodes(), set(state.get_draining_nodes())


class NodeLoss:
    """Per trial: its failures as Tune counted them when last seen, and the lost nodes given back."""

    def __init__(self) -> None:
        self.counted: dict[str, int] = {}
        self.given_back: dict[str, int] = {}
        self.reports: dict[str, dict] = {}  # trial id -> its newest result in its current attempt

    def seen(self, trial: Any) -> None:
        """An attempt of `trial` starts: it has reported nothing yet."""
        self.counted.setdefault(trial.trial_id, trial.run_metadata.num_failures)
        self.reports.pop(trial.trial_id, None)

    def reported(self, trial: Any, result: dict) -> None:
        self.reports[trial.trial_id] = result

    def on_recover(self, trial: Any, nodes: Nodes) -> str:
        """Called as Tune retries `trial`, once `nodes` was polled (its lines said): give a lost node back to its
        budget; the line that says what happened."""
        last = self.reports.pop(trial.trial_id, None) or {}  # {}: it failed before its first report
        node = last.get("ray_node")
        error = _last_failure(trial)
        # A drained trial's actor dies with the node's raylet: Ray says only that "the actor died unexpectedly",
        # and the node may still be listed alive until its heartbeats time out. The trial said it saved.
        drained = bool(last.get("drained")) or bool(node and node in nodes.drained)
        lost = drained or any(m in error for m in LOST_MARKERS) or bool(node and node not in nodes.alive)
        counted = trial.run_metadata.num_failures > self.counted.get(trial.trial_id, 0)
        step = _checkpoint_step(trial)
        whence = f"step {step} (its last checkpoint)" if step else "step 0 (no checkpoint yet)"
        if lost and counted and self.given_back.get(trial.trial_id, 0) < MAX_NODE_LOSSES:
            self.given_back[trial.trial_id] = self.given_back.get(trial.trial_id, 0) + 1
            trial.run_metadata.num_failures -= 1  # a lost node is not the trial's failure
        self.counted[trial.trial_id] = trial.run_metadata.num_failures
        if lost:
            how = "drained" if drained else "lost"
            # With no report in this attempt, Ray's error names the dead actor's IP (`\tip: ...`).
            where = nodes.name(node) if node else nodes.name_at(_failed_ip(error))
            return f"trial {trial.trial_id}: {where} {how}; it continues from {whence} on another node"
        return f"trial {trial.trial_id} failed and is retried from {whence}: its error is in {trial.local_path}"


def _checkpoint_step(trial: Any) -> int | None:
    try:
        result = trial.latest_checkpoint_result
        return int(result.metrics.get("step")) if result is not None else None
    except Exception:
        return None


def _failed_ip(error: str) -> str | None:
    found = re.search(r"^\s*ip: (\S+)", error, re.MULTILINE)
    return found.group(1) if found else None


def _last_failure(trial: Any) -> str:
    """The text Tune wrote for the trial's newest failure (its error.txt), or ''."""
    try:
        with open(trial.error_file) as fh:
            return fh.read().rsplit("Failure #", 1)[-1]
    except (OSError, TypeError):
        return ""


class _NodeLossFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from ray.exceptions import RayActorError

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, RayActorError)


# What Ray publishes to every driver when a node goes: the dead raylet's last 20 log lines (40 lines of state dump
# in the job log, each time), that the node "has been marked dead", and the GCS failing to free the dead node's
# placement-group bundles. The console's node lines say which node left; its raylet.out is kept with its Ray logs.
NODE_GONE_NOISE = (("raylet", "Raylet is terminated"), ("raylet", "has been marked dead because"),
                   ("gcs_server", "Failed to remove"))


def _is_node_gone_noise(data: dict) -> bool:
    text = "".join(data.get("lines") or [])[:400]
    return any(data.get("pid") == pid and marker in text for pid, marker in NODE_GONE_NOISE)


def quiet_node_losses() -> None:
    """Tune logs each failed trial with its traceback; a lost actor's is said in one line by the console. Ray's
    own messages of a node gone (NODE_GONE_NOISE) are left out of the driver's output."""
    logging.getLogger("ray.tune.execution.tune_controller").addFilter(_NodeLossFilter())
    try:  # Ray has no public switch for these; its driver looks this function up at each message
        from ray._private import worker
    except ImportError:
        return
    printer = worker.print_worker_logs
    if getattr(printer, "_cifarray_quiet", False):
        return

    def print_worker_logs(data, *args, **kwargs):
        if not _is_node_gone_noise(data):
            printer(data, *args, **kwargs)

    print_worker_logs._cifarray_quiet = True
    worker.print_worker_logs = print_worker_logs
