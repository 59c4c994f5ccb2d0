"""A Ray worker's warnings and errors as one line each, headed by trial and rank (cifarray.train.workerlog)."""

from __future__ import annotations

import logging
import warnings

import pytest

from cifarray.train.workerlog import label, worker_log


def warn_here(text: str) -> None:
    warnings.warn(text)  # one place in the code: Python shows a warning once per place unless told again


def test_warnings_log_records_and_errors_are_one_line_each_and_named(capsys):
    with worker_log(label("3767a15c", 0)):
        warn_here("first\nsecond line")
        logging.getLogger("family").warning("lr %s is large", 0.5)
        logging.getLogger("family").info("not for the job log")
    with pytest.raises(ValueError):
        with worker_log(label(None, 1)):
            raise ValueError("bad\nthing")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[trial 3767a15c rank 0] UserWarning: first | second line (")
    assert err[1] == "[trial 3767a15c rank 0] warning (family): lr 0.5 is large"
    assert err[2] == "[rank 1] error: ValueError: bad | thing" and len(err) == 3


def test_a_reused_actors_next_trial_shows_a_warning_the_last_one_showed():
    shown = []
    for trial in ("aaaa", "bbbb"):
        with worker_log(label(trial, 0)):
            original = warnings.showwarning
            warnings.showwarning = lambda m, c, f, n, file=None, line=None, t=trial: shown.append((t, str(m)))
            warn_here("again")
            warnings.showwarning = original
    assert shown == [("aaaa", "again"), ("bbbb", "again")]


def test_the_root_logger_is_as_it_was_afterwards():
    root = logging.getLogger()
    before = (root.handlers[:], root.level, warnings.showwarning)
    with worker_log("x"):
        assert root.level == logging.WARNING
    assert (root.handlers, root.level, warnings.showwarning) == before


def test_tunes_systemexit_in_a_weakref_callback_is_not_printed_but_other_ignored_errors_are():
    import sys
    import weakref

    from cifarray.train.workerlog import quiet_worker_exits

    hook, seen = sys.unraisablehook, []
    try:
        sys.unraisablehook = lambda u: seen.append(u.exc_type)  # what Python would print
        quiet_worker_exits()
        quiet_worker_exits()  # once per actor, whatever the number of trials
        for exc in (SystemExit(1), ValueError("real")):
            class Thing:
                pass

            def callback(ref, exc=exc):
                raise exc

            thing = Thing()
            ref = weakref.ref(thing, callback)
            del thing  # the callback raises: Python reports it through sys.unraisablehook
            del ref
        assert seen == [ValueError]
    finally:
        sys.unraisablehook = hook


def test_a_trial_actor_is_quiet_from_its_creation_not_only_once_a_trial_runs():
    """Tune's actor imports cifarray.tune.trial when it unpickles the trainable, before any trial runs; a SIGTERM
    then (an actor Tune no longer needs) must not print Ray's SystemExit as a traceback either."""
    import subprocess
    import sys

    code = ("import sys; import cifarray.tune.trial; "
            "print('QUIET', getattr(sys.unraisablehook, 'cifarray', False))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "QUIET True" in proc.stdout, proc.stdout + proc.stderr[-2000:]
