"""User-facing errors and the CLI wrapper that turns them into one-line messages.

A `UserError` is something the user can fix (a bad path, a wrong flag, a corrupt
file): the CLI prints its message on one line and exits with status 2, without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


class DataError(UserError):
    """A data file is missing, corrupt, or not in the CIFAR-100 format."""


class BudgetError(UserError):
    """A model has more trainable parameters than its budget allows."""


EXIT_USER_ERROR = 2


def _terminate(signum, frame):
    raise KeyboardInterrupt


def handle_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt. Called again after ray.init, whose core worker installs its own
    handler that aborts the process with a stack dump instead."""
    signal.signal(signal.SIGTERM, _terminate)


SHUTDOWN_GRACE_S = 10.0


def _exit_if_shutdown_hangs(code: int, grace: float = SHUTDOWN_GRACE_S) -> None:
    """End the process with `code` if its exit hooks still run after `grace` seconds.

    SIGTERM sent to a whole process group (`timeout`, `kill -- -PGID`, a service manager) stops the local
    Ray cluster that the driver started along with the driver; Ray's and Tune's exit hooks then wait 60 s
    for the gone cluster and end in a fatal log. A normal exit (shutting a live local Ray down) takes ~2 s.
    Exit hooks run while daemon threads still do, so this timer can end the wait."""
    def end() -> None:
        print(f"(Ray's shutdown was still waiting after {grace:g} s: its cluster is gone; exiting)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(grace, end)
    timer.daemon = True
    timer.start()


_WAITING_IN_RAY: set[threading.Thread] = set()


def waits_in_ray(thread: threading.Thread) -> None:
    """`thread` waits inside a Ray call that an interrupted main thread cannot end (Ray Train's fit): while it
    lives, an interrupted CLI ends without Ray's own exit hook (`_exit_beside_a_thread_in_ray`)."""
    _WAITING_IN_RAY.add(thread)


def _exit_beside_a_thread_in_ray(code: int) -> None:
    """End the process with `code` while a thread still waits in Ray.

    Ray's exit hook (ray.shutdown) ends the driver's core worker first; the waiting thread then wakes into it, and
    Ray ends the process itself with status 1 ("The core worker has already been shutdown ... The process will
    exit"): an interrupted `train` exited 1, not 130, once in the suite. Here every other exit hook runs (this
    run's token folder, ...), and then the process ends at once. A local Ray's processes share its fate (Ray
    starts them so that the kernel ends them with it, as after a SIGKILL); a cluster's GCS ends the job's actors
    when their driver is gone."""
    import atexit

    from ray._private import worker

    _exit_if_shutdown_hangs(code)  # the other hooks may wait on a cluster that is gone (SIGTERM to the group)
    atexit.unregister(worker.shutdown)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)` and exit; a `UserError` becomes `error: ...` on stderr and exit 2.

    A process that the interpreter started for this command (`python -m cifarray.train ...`, nothing profiling or
    tracing it) ends through `exit_without_teardown`. Any other caller gets `sys.exit`: a test or program that
    passes `argv`, `python -m cProfile -m ...` (which writes its profile after the command returns), IPython's
    `%run -m`, a debugger.

    SIGTERM (what Slurm sends before preemption or at the time limit) is handled like
    Ctrl-C, so that `finally` blocks and Ray's shutdown run and checkpoints stay usable.
    """

    handle_sigterm()
    leave = exit_without_teardown if argv is None and _started_for(main) else sys.exit
    try:
        code = main(argv)
    except UserError as exc:
        # One line, even when the message was built from multi-line parts.
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        leave(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        if any(t.is_alive() for t in _WAITING_IN_RAY):
            _exit_beside_a_thread_in_ray(130)
        if "ray" in sys.modules:
            _exit_if_shutdown_hangs(130)
        sys.exit(130)
    leave(code or 0)


def _started_for(main: Callable) -> bool:
    """Whether this interpreter was started as `python [options] -m M` for the module that defines `main`, and
    nothing profiles or traces it."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return False
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    args = iter(getattr(sys, "orig_argv", [])[1:])
    for arg in args:
        if arg in ("-X", "-W"):  # options that take a value
            next(args, None)
        elif arg.startswith("-m"):
            module = arg[2:] or next(args, "")
            return spec is not None and spec.name in (module, f"{module}.__main__")
        elif arg == "-c" or not arg.startswith("-"):  # a command string or a script
            return False
    return False


def exit_without_teardown(code: int) -> None:
    """End a CLI process as `sys.exit(code)` would, without the interpreter's teardown of its modules.

    What a clean exit must do still happens, as the interpreter does it (Py_FinalizeEx): `threading._shutdown` ends
    the thread pools (concurrent.futures, which torch's inductor uses) and waits for the threads that are not
    daemons, then every exit hook runs (Ray's shutdown, the run's token folder, logging's flush), then stdout and
    stderr are flushed. What is skipped is the interpreter freeing every module and object one by one, which does
    nothing a file or a process can see: 1-2 s of CPU once torch (and torch._dynamo, which its optimizers import)
    is loaded, on every `python -m cifarray...` run (docs/BENCHMARKS.md). cifarray leaves no file open to be
    closed by it. (Joining the threads by hand instead hung a --compile run: a pool's idle worker thread waits
    for the pool's own exit hook, which `threading._shutdown` runs first.)"""
    import atexit

    shutdown = getattr(threading, "_shutdown", None)  # CPython's own, since 3.x; another Python exits as usual
    if shutdown is None or threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (BrokenPipeError), or a closed stream
            pass
    os._exit(code)
