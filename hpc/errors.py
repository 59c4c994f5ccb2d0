"""hpc's own user errors and CLI wrapper: hpc/ is cluster plumbing and imports nothing from cifarray.

Same contract as the toolkit's CLIs: a `UserError` (bad flag, missing Slurm, wrong node count) prints
`error: ...` on one line and exits 2 without a traceback; anything else is a bug and keeps its
traceback. SIGTERM (Slurm's pre-emption and time-limit signal) is handled like Ctrl-C, so that
`finally` blocks run and the Ray head and workers are stopped.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def handle_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt (call again after anything that installs its own handler)."""
    signal.signal(signal.SIGTERM, _interrupt)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)` and exit with its code; a `UserError` becomes one `error:` line and exit 2."""
    handle_sigterm()
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
