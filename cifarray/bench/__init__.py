"""Benchmarks: each prints its numbers next to a plain-PyTorch/torchvision baseline run in the same process."""

import os
import platform


def machine() -> str:
    """This machine's CPU model and core count, as a bench's first line names them."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"
