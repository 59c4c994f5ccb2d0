"""Where a run's fixed seconds go: named marks with their wall-clock times, for `python -m cifarray.bench startup`.

When $CIFARRAY_PHASES names a file, `mark` appends one JSON line to it: the mark, the time, the process. The
driver and its Ray workers (which inherit the driver's environment on a local Ray cluster) write to the same
file; each line is one O_APPEND write, so lines of different processes do not interleave. Unset (every run but
the bench's), a mark costs one environment lookup and writes nothing.
"""

from __future__ import annotations

import json
import os
import time

ENV = "CIFARRAY_PHASES"


def enabled() -> bool:
    """Whether this run is being timed (what a mark would write goes somewhere)."""
    return bool(os.environ.get(ENV))


def mark(name: str, **extra: object) -> None:
    if not enabled():
        return
    path = os.environ[ENV]
    line = json.dumps({"mark": name, "t": time.time(), "pid": os.getpid(), **extra}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides, as for a run folder
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(path: str | os.PathLike) -> list[dict]:
    """The marks of a file in the order they were written."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
