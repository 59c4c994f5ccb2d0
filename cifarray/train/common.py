"""What the training engine builds on: provenance, checkpoints, collectives, worker set-up, precision.

The run folder and metrics.csv live in `cifarray.rundir`, the run's data in `cifarray.data.loader`.

Whatever runs the engine (`cifarray.train.session`), `rank == 0` is the one process that writes files;
every rank takes part in collectives and in the session's reports.
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
    from importlib.metadata import version

    import numpy
    import torchvision

    return {
        # Only training workers call this, and their optimizer has already loaded torch._dynamo, the costly
        # part of importing torchvision; its __version__ names the build (e.g. +cu130), its metadata does not.
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "ray": version("ray"), "numpy": numpy.__version__},
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


def report(session, run: RunDir, metrics: dict[str, Any], state: dict[str, Any] | None, rank: int) -> None:
    """Report to the session's runner (all ranks must call); rank 0 attaches the checkpoint and records its step.

    Metrics that are not yet measured (NaN) are left out. last_checkpoint.json is written after the
    report returned, i.e. once the runner has persisted the checkpoint; Ray Train registers it when its
    controller next polls, so a crash within that window resumes from the one before.
    """
    metrics = {k: v for k, v in metrics.items() if v == v}
    if state is None or rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        session.report(metrics, tmp)
    run.write_json("last_checkpoint.json", {"step": state["step"]})


def checkpoint_candidates(latest: Path | None) -> list[Path]:
    """The runner's newest checkpoint folder first, then the others beside it, newest first."""
    if latest is None:
        return []
    others = [d for d in latest.parent.glob("checkpoint_*") if d.is_dir() and d != latest]
    return [latest, *sorted(others, key=lambda d: d.stat().st_mtime, reverse=True)]


def load_resume_point(latest: Path | None, say=None) -> dict[str, Any] | None:
    """The state of the newest checkpoint that loads, skipping (and naming, through `say`) those that do not.

    A truncated or corrupt checkpoint (a full disk, a flaky network file system) costs the steps since the one
    before it, not the run; when none loads, a UserError says so with the fix."""
    from cifarray.errors import UserError
    from cifarray.rundir import torch_load_problem

    candidates = checkpoint_candidates(latest)
    why = ""
    for folder in candidates:
        state, why = torch_load_problem(folder / CHECKPOINT_FILE)
        if why is None and not (isinstance(state, dict) and "step" in state):
            why = "not a cifarray checkpoint (no step)"
        if why is None:
            return state
        if say is not None:
            say(f"note: checkpoint {folder} does not load ({why}); skipped")
    if not candidates:
        return None
    raise UserError(f"no checkpoint of this run loads ({len(candidates)} in {candidates[0].parent}; the newest: "
                    f"{why}); move {candidates[0].parent} aside to train the run again from step 0, or pass another "
                    "--out")


def stop_diverged(session, run: RunDir, step: int, loss: float, rank: int, scored: dict[str, float]) -> None:
    """Record a NaN/inf loss for the driver to report, and end this rank's loop cleanly (all ranks call).

    `scored`: the objective at its worst, reported with it (Tune refuses a result without its metric, and a
    sweep would end with that error)."""
    if rank == 0:
        last = run.read_json("last_checkpoint.json")
        run.write_json("diverged.json", {"step": step, "loss": str(loss),
                                         "last_checkpoint_step": last and last["step"]})
    report(session, run, {"step": step, "diverged": 1, **scored}, None, rank)


def restore(components: dict[str, Any], session) -> int:
    """Load the newest loadable checkpoint into named stateful components; returns its step (0: none)."""
    import sys

    state = load_resume_point(session.latest_checkpoint(), say=lambda line: print(line, file=sys.stderr, flush=True))
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


def reset_global_state(cfg) -> None:
    """Every piece of process-wide state a run depends on, set at its start: a run's numbers then do not depend
    on what ran before it in the same process (a Tune actor runs trial after trial)."""
    import random

    import numpy

    random.seed(cfg.seed)
    numpy.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)  # every device's default generator: identical initial weights on every rank
    torch.set_num_threads(cfg.cpus_per_worker or max(1, (os.cpu_count() or 1) // cfg.workers))
    torch.set_grad_enabled(True)
    torch.clear_autocast_cache()
    if cfg.compile:
        # Dynamo caches compiled frames per code object, 8 at most: trial after trial would fall back to eager.
        import torch._dynamo as dynamo

        dynamo.reset()


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
