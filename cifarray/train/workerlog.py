"""A Ray worker's warnings and errors, in the job log, named by the trial and rank they came from.

The driver starts Ray with `log_to_driver`, so each worker's stdout and stderr reach the job log, but Ray heads a
line only with its process ("(run_trial pid=2792)", "(RayTrainWorker pid=81, ip=10.0.0.2)"): which trial, which
rank, is not said, and a sweep runs several at once. While the engine runs in a Ray worker, its Python warnings and
its WARNING-or-worse log records are written to stderr as one line each, headed "[trial 3767a15c rank 0]"; an error
that ends the worker is written so too, before Ray's own report of it. Ray Train and Tune's INFO records in the
worker (a line per checkpoint) are kept out of the job log.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

QUIET = ("ray.train", "ray.tune")  # their INFO in a worker: "Checkpoint successfully created at ..." per report


def label(trial: str | None, rank: int) -> str:
    return f"trial {trial} rank {rank}" if trial else f"rank {rank}"


def one_line(text: object) -> str:
    return " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


class _Handler(logging.Handler):
    def __init__(self, head: str):
        super().__init__(logging.WARNING)
        self.head = head

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"[{self.head}] {record.levelname.lower()} ({record.name}): "
                             f"{one_line(record.getMessage())}\n")
            sys.stderr.flush()
        except Exception:  # a log line must never end the training
            self.handleError(record)


@contextlib.contextmanager
def worker_log(head: str) -> Iterator[None]:
    """Within: warnings and WARNING+ records go to stderr headed `[head]`; an escaping exception is written too."""
    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(f"[{head}] {category.__name__}: {one_line(message)} ({filename}:{lineno})\n")
        sys.stderr.flush()

    root = logging.getLogger()
    # The root's records are this worker's own (Ray's go through the "ray" logger, which does not propagate): ours
    # alone print them, and from WARNING up (Ray Train's "Reporting training result" INFO, per report, logs
    # through a logger named after its file, so it is quieted here, not by name).
    handlers, level = root.handlers[:], root.level
    root.handlers = [_Handler(head)]
    root.setLevel(logging.WARNING)
    quiet = {name: logging.getLogger(name).level for name in QUIET}
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # catch_warnings: the filters as they were, and a warning shown once per place in an earlier trial of a
    # reused actor is shown again for this one (entering it invalidates the once-registries).
    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            yield
        except Exception as exc:
            sys.stderr.write(f"[{head}] error: {type(exc).__name__}: {one_line(exc)}\n")
            sys.stderr.flush()
            raise
        finally:
            root.handlers = handlers
            root.setLevel(level)
            for name, was in quiet.items():
                logging.getLogger(name).setLevel(was)


def quiet_worker_exits() -> None:
    """In a Ray worker (a Tune trial's actor, a Ray Train worker), for its lifetime: Tune ends a trial's training
    thread by raising SystemExit in it (ASHA's stop, the end of the trial), and Ray's SIGTERM handler ends the actor
    so at the sweep's end; when that lands in a weakref callback, Python prints it as an ignored exception, a
    traceback in the job log for a trial or actor that ended as it should. Only that one is not printed."""
    hook = sys.unraisablehook
    if getattr(hook, "cifarray", False):
        return

    def unraisable(u) -> None:
        if u.exc_type is SystemExit:
            return
        hook(u)

    unraisable.cifarray = True
    sys.unraisablehook = unraisable
