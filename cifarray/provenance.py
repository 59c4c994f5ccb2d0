"""Where a result came from: versions, this project's git commit, the device and the host (summary.json)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds the `cifarray` package


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
