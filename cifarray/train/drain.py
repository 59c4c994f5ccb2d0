"""A Ray node that is about to leave: how a training worker on it notices, saves, and waits to be moved.

A node leaves with notice through Ray's own drain API (a join job told to leave: `hpc.join`; a cloud autoscaler's
preemption): Ray places nothing new on it and lists it in `get_draining_nodes()`. `DrainWatch` polls that list in a
background thread (one GCS call every POLL_S, never in the training step), so the engine's per-step check is a
flag read. The engine then checkpoints at its next step, reports it, and parks (`park`): no step after the
checkpoint is trained here, so none is trained twice once the trial continues elsewhere. When the node is stopped
Ray reports the worker's actor as preempted and Tune retries the trial from that checkpoint without spending its
failure budget. If the drain is cancelled, the worker trains on.

The node's leaving job waits for its workloads to save through a registry in Ray's internal KV (namespace
`hpc-drain`, key `<node id>/<pid>`: `saving`, then `parked`); see hpc/join.py.
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5
NAMESPACE = "hpc-drain"  # hpc.join.DRAIN_NAMESPACE (hpc imports nothing from cifarray, and the reverse holds too)


class DrainWatch:
    """Whether this process's Ray node is draining, kept current by a daemon thread."""

    def __init__(self) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.draining = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="drain-watch", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        from ray._private.state import state  # Ray's own list of draining nodes (the GCS's), read as Ray Data does

        while not self._stop.wait(POLL_S):
            try:
                draining = self.node_id in state.get_draining_nodes()
            except Exception:  # the GCS is briefly unreachable: keep the last answer
                continue
            if draining and not self.draining:
                self._mark(b"saving")
            self.draining = draining

    def _mark(self, value: bytes) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        try:
            _internal_kv_put(f"{self.node_id}/{os.getpid()}", value, overwrite=True, namespace=NAMESPACE)
        except Exception:  # the registry only shortens the node's wait; its deadline still holds
            pass

    def park(self) -> None:
        """The checkpoint is with the runner: wait here until the node is stopped (or its drain is cancelled)."""
        self._mark(b"parked")
        while self.draining:
            time.sleep(POLL_S)

    def close(self) -> None:
        self._stop.set()


_WATCH: DrainWatch | None = None


def watch() -> DrainWatch:
    """This process's watch, started on first use (a reused Tune actor keeps it across trials)."""
    global _WATCH
    if _WATCH is None:
        _WATCH = DrainWatch()
    return _WATCH
