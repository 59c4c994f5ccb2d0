"""What the training engine builds on: provenance, checkpoints, collectives, worker set-up, precision.

The run folder and metrics.csv live in `cifarray.rundir`, the run's data in `cifarray.data.loader`.

Inside a Ray Train worker, `rank == 0` is the one process that writes files; every
rank takes part in collectives and in `ray.train.report`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cifarray.rundir import RunDir

CHECKPOINT_FILE = "state.pt"


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the `cifarray` package


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """This project's own commit, or None.

    Only when `root` (the folder holding the package) is itself the top of a git work tree: a copy of
    the project inside another repository, or an install under site-packages of some checkout, would
    otherwise report that repository's HEAD, which says nothing about this code.
    """
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root.resolve():
        return None
    return lines[1]


def provenance(device: torch.device) -> dict[str, Any]:
    import numpy
    import ray
    import torchvision

    return {
        # Only training workers call this, and their optimizer has already loaded torch._dynamo, the costly
        # part of importing torchvision; its __version__ names the build (e.g. +cu130), its metadata does not.
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "ray": ray.__version__, "numpy": numpy.__version__},
        "git_commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "host": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),  # Ray nodes started inside a Slurm job inherit it
    }


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def params_sha256(model: torch.nn.Module) -> str:
    """Hash of the trainable parameters: identical across DDP ranks when they are in sync."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def write_worker_info(run: RunDir, rank: int, **info: Any) -> None:
    """workers/rank{r}.json: PID, host and state of each worker (for operators, py-spy, and tests)."""
    run.workers.mkdir(exist_ok=True)
    name = f"workers/rank{rank}.json"
    run.write_json(name, {**(run.read_json(name) or {}), **info, "updated": time.time()})


def next_attempt(run: RunDir) -> int:
    """How many times the training function has started in this run folder (0 first)."""
    seen = run.read_json("attempts.json") or {"attempts": 0}
    run.write_json("attempts.json", {"attempts": seen["attempts"] + 1})
    return seen["attempts"]


def report(run: RunDir, metrics: dict[str, Any], state: dict[str, Any] | None, rank: int) -> None:
    """Report to Ray Train (all ranks must call); rank 0 attaches the checkpoint and records its step.

    Metrics that are not yet measured (NaN) are left out. last_checkpoint.json is written after the
    report returned, i.e. once the checkpoint is persisted; Ray registers it when its controller next
    polls, so a crash within that window resumes from the one before.
    """
    import ray.train

    metrics = {k: v for k, v in metrics.items() if v == v}
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    run.write_json("last_checkpoint.json", {"step": state["step"]})


def latest_state() -> dict[str, Any] | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def stop_diverged(run: RunDir, step: int, loss: float, rank: int) -> None:
    """Record a NaN/inf loss for the driver to report, and end this rank's loop cleanly (all ranks call)."""
    if rank == 0:
        last = run.read_json("last_checkpoint.json")
        run.write_json("diverged.json", {"step": step, "loss": str(loss),
                                         "last_checkpoint_step": last and last["step"]})
    report(run, {"step": step, "diverged": 1}, None, rank)


def restore(components: dict[str, Any]) -> int:
    """Load the latest Ray Train checkpoint into named stateful components; returns its step (0: none)."""
    state = latest_state()
    if state is None:
        return 0
    for name, component in components.items():
        component.load_state_dict(state[name])
    return int(state["step"])


def snapshot(components: dict[str, Any], step: int) -> dict[str, Any]:
    """Checkpoint state: every component's state_dict, and the step it was taken at."""
    return {"step": step, **{name: component.state_dict() for name, component in components.items()}}


def augment_seed(seed: int, rank: int, step: int) -> int:
    # Reseeded at every checkpoint step, so a resumed run draws what the uninterrupted run drew.
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def setup_worker(cfg) -> tuple[torch.device, int, int]:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    threads = cfg.cpus_per_worker or max(1, (os.cpu_count() or 1) // cfg.workers)
    torch.set_num_threads(threads)
    return device, rank, world


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto: bf16 where the hardware computes it natively, else fp32.

    On this project's 2-core Xeon (AMX) bf16 autocast trains DenseNet 1.4-1.5x faster than fp32,
    with AVX512-BF16 alone (oneDNN capped below AMX) 1.17x; a CPU without either emulates bf16
    and ran 0.84x of fp32, so it keeps fp32 (docs/BENCHMARKS.md).
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_amx_tile_supported",
                                                                  "_is_avx512_bf16_supported")]
    return "bf16" if any(f() for f in native) else "fp32"


def channels_last(x):
    """A module or a 4-d batch in the layout every family trains in, on every device.

    CUDA's tensor cores want it; on CPU, oneDNN's convolutions and batch norm ran DenseNet and DCGAN
    steps 1.2-1.4x faster in it than in contiguous NCHW (fp32, 2-core AMD EPYC; level within noise on
    the AMX Xeon in bf16): docs/BENCHMARKS.md "Memory format".
    """
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device, precision: str, cache: bool = True):
    """Mixed precision for a resolved --precision: weights, optimizer state and losses stay fp32.

    `cache=False` inside a captured CUDA graph (PyTorch's graph notes: the cast cache must not outlive capture).
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache)
