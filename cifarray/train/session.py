"""Who runs the training engine: the one small object the loop asks for its rank, device, reports and resume point.

`cifarray.train.engine.train` never asks who launched it (MAE's engine, STYLE.md). It gets a `Session`:

- `RayTrainSession`: a Ray Train worker of a `TorchTrainer` (`python -m cifarray.train`, and sweep trials with
  several DDP workers): rank and world from Ray Train, DDP over gloo or NCCL, reports to Ray Train's controller.
- `TuneSession`: a Tune trial that trains inside its own actor (one worker, no trainer, no extra actors). Tune
  reuses the actor for the next trial, so torch, the CUDA context and the device-resident data set are paid
  once per actor (`TuneSession.data` keeps the data set per actor, keyed by what it was made from).
- `LocalSession`: this process, no Ray at all: `python -m cifarray.train --runner local` (what `auto` picks for
  one worker on one machine), the benches and tests. Its checkpoints go where Ray Train's do (RUN_DIR/ray), so that
  a run resumes whichever runner wrote its newest one (`cifarray.train.checkpoint.checkpoint_candidates`).

A report carries the metrics and, at checkpoint steps, a folder holding the checkpoint file; the runner persists
it (Ray Train and Tune copy it into their storage), and `latest_checkpoint` is where the runner says the newest
one is: its siblings are the older ones (`cifarray.train.checkpoint.load_resume_point` falls back to them).
Only this module imports Ray for the engine, the families and the benches.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from cifarray.data.loader import PreparedData, data_identity
from cifarray.rundir import RunDir
from cifarray.train.checkpoint import checkpoint_folders
from cifarray.train.runfolder import RAY_RUN_NAME


class Session:
    """What the engine needs from whatever runs it. The base is one process, rank 0 of 1."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    name: str = "session"
    in_ray: bool = False  # a Ray worker: its warnings reach the job log headed by trial and rank (workerlog)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train with: DDP where there are several ranks."""
        return model

    def data(self, cfg: Any) -> PreparedData:
        """The run's splits on this session's device."""
        return cfg.data_source().prepare(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """Hand one result (and, when given, the folder holding a checkpoint) to the runner. Every rank calls."""
        raise NotImplementedError

    def latest_checkpoint(self) -> Path | None:
        """The folder of the newest checkpoint the runner knows of (None: a fresh run)."""
        raise NotImplementedError

    def draining(self) -> bool:
        """Whether this worker's node is about to leave (cifarray.train.drain): checkpoint now, then `park`."""
        return False

    def park(self) -> None:
        """After the drain checkpoint was reported: wait until the node is stopped or its drain cancelled."""


class _OnRayNode(Session):
    """A session on a Ray node, which may be drained (cifarray.train.drain)."""

    in_ray = True

    def draining(self) -> bool:
        from cifarray.train.drain import watch

        return watch().draining

    def park(self) -> None:
        from cifarray.train.drain import watch

        watch().park()

    @staticmethod
    def node_id() -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class RayTrainSession(_OnRayNode):
    """A worker of a Ray Train `TorchTrainer`: one of `world` DDP ranks."""

    name = "ray-train"

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        from cifarray.train.workerlog import quiet_worker_exits

        quiet_worker_exits()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, "ray_node": self.node_id()}, checkpoint=checkpoint)

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        return _local(ray.train.get_checkpoint())


class TuneSession(_OnRayNode):
    """A one-worker Tune trial computing in its own (reused) actor: `tune.report`, `tune.get_checkpoint`.

    On a GPU trial Ray leaves the actor its GPU (or its share of one) as the only visible device."""

    name = "tune"

    def __init__(self, gpu: bool) -> None:
        if gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("a GPU trial's actor sees no CUDA device (CUDA_VISIBLE_DEVICES="
                                   f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    data_cached = False  # whether this trial found its data set already on the device (a reused actor)

    def data(self, cfg: Any) -> PreparedData:
        hits = ACTOR_DATA.hits
        value = ACTOR_DATA.get(cfg, self.device)
        self.data_cached = ACTOR_DATA.hits > hits
        return value

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        # ray_node: where the trial ran, for the sweep's lines when a node leaves (cifarray.tune.elastic)
        tune.report({**metrics, "ray_node": self.node_id()},
                    checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def latest_checkpoint(self) -> Path | None:
        from ray import tune

        return _local(tune.get_checkpoint())

    @staticmethod
    def release() -> None:
        """After a trial on a GPU: what it allocated there goes back (the actor's data set stays).

        Only where CUDA is in use: a full collection frees the tensors that reference cycles still hold, and the
        caching allocator returns the memory. On the CPU, Python's own collector is left to it: a full collection
        took ~0.4 s of a reused actor on 2 cores, between one trial's end and the next's start (Tune waits for the
        trial's thread to end before it resets the actor)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            import gc

            gc.collect()
            torch.cuda.empty_cache()


class LocalSession(Session):
    """In this process, without Ray: checkpoints in RUN_DIR/ray (the newest `keep`), reports recorded.

    `reports` lists every report in order: (metrics, checkpoint step or None, summary.json written yet)."""

    name = "local"
    keep = 2

    def __init__(self, run_dir: str | Path, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.folder = Path(run_dir) / RAY_RUN_NAME
        self.summary = RunDir(run_dir).summary
        self.reports: list[tuple[dict[str, Any], int | None, bool]] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        step = None
        if checkpoint_dir:
            step = int(metrics.get("step", 0))
            target = self.folder / f"checkpoint_{step:07d}"
            # Copied beside its final name, then renamed: a run killed mid-copy leaves no half checkpoint under it.
            partial = self.folder / f".partial_{target.name}"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(checkpoint_dir, partial)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            for old in checkpoint_folders(self.folder)[self.keep:]:  # Ray Train's too, after a change of runner
                shutil.rmtree(old, ignore_errors=True)
        self.reports.append((dict(metrics), step, self.summary.is_file()))

    def latest_checkpoint(self) -> Path | None:
        found = checkpoint_folders(self.folder)
        return found[0] if found else None


def _local(checkpoint: Any) -> Path | None:
    # This project's storage is a local or shared file system (RUN_DIR/ray, OUT/tune): the path is the folder.
    return None if checkpoint is None else Path(checkpoint.path)


class ActorData:
    """The data set of one actor, kept across the trials Tune runs in it.

    Keyed by the data's folder and its files' identity (inode, size, mtime), the validation split and the seed
    (which pick the split), and the device: a trial whose key differs drops the old set and loads its own. A
    cached set is never written to (batches are gathered copies), so a trial sees what a fresh load gives."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: PreparedData | None = None
        self.hits = 0
        self._lock = threading.Lock()

    def get(self, cfg: Any, device: torch.device) -> PreparedData:

        source = cfg.data_source()
        key = (data_identity(source.folder), source.verify, source.val_size, source.seed, str(device))
        with self._lock:
            if key != self.key:
                self.key = self.value = None  # dropped before the new one is made: one set on the device at a time
                TuneSession.release()
                self.value, self.key = source.prepare(device), key
            else:
                self.hits += 1
            return self.value


ACTOR_DATA = ActorData()
