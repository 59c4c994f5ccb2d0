"""Who could have written what is about to be unpickled: a pickle runs the code of whoever wrote it.

    python -m hpc.unpickle -u -m submitit.core._submit FOLDER

is how a submitit job starts on its node (hpc.submit gives submitit this module as its python): FOLDER, the job's own
folder in it and the job's pickle are checked, and only then does submitit's own command run, in this process's
place. Another user's file, or one that others can write, stops the job in one line (exit 2) before anything is
unpickled. Standard library only at import: it runs before every submitit job, and cifarray uses
`writable_by_others` too (`cifarray.tune --resume`).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
from pathlib import Path

SUBMITIT = ["-u", "-m", "submitit.core._submit"]  # what submitit runs after its python (submitit 1.5)


def writable_by_others(*paths: Path, below: Path | None = None) -> tuple[Path, str] | None:
    """The first of `paths`, then of `below` and everything in it (links not followed), that another user could have
    written, and how: a file there could be replaced, and what unpickles it would run that user's code. Writable by
    all, owned by someone else than this user or root (root can do anything anyway), or writable by a group that
    others belong to (a user's own private group, which umask 002 systems give each user, does not count). A path
    that does not exist is skipped: there is nothing there to unpickle."""
    me = os.getuid()
    try:
        mine = pwd.getpwuid(me).pw_name
    except KeyError:
        mine = None

    def shared_group(gid: int) -> bool:
        try:
            group = grp.getgrgid(gid)
        except KeyError:
            return True
        return not (group.gr_name == mine and set(group.gr_mem) <= {mine})

    def problem(path: str) -> str | None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return None  # only who can write its folder could have made or changed it
        if st.st_uid not in (me, 0):
            return f"owned by uid {st.st_uid}"
        if st.st_mode & 0o002:
            return f"mode {stat.S_IMODE(st.st_mode):04o}: writable by every user"
        if st.st_mode & 0o020 and shared_group(st.st_gid):
            return f"mode {stat.S_IMODE(st.st_mode):04o}: writable by group {st.st_gid}"
        return None

    def candidates():
        yield from map(str, paths)
        for root, _, files in os.walk(below) if below is not None else ():
            yield root
            yield from (os.path.join(root, n) for n in files)

    for path in candidates():  # the first found ends the walk
        try:
            why = problem(path)
        except OSError:
            continue  # gone meanwhile: nothing to unpickle there
        if why:
            return Path(path), why
    return None


def fixed_part(folder: str) -> Path:
    """submitit's folder up to its first %-pattern (%j, %A: filled in per job), or the nearest part of it that
    exists: what a job's folder is made in."""
    path = Path(folder.split("%", 1)[0] or ".").expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def main(argv: list[str]) -> int:
    if argv[:len(SUBMITIT)] != SUBMITIT or len(argv) != len(SUBMITIT) + 1:
        print(f"error: python -m hpc.unpickle runs `{' '.join(SUBMITIT)} FOLDER` only (got {' '.join(argv)}); "
              "it is the python hpc.submit gives submitit", file=sys.stderr)
        return 2
    folder = argv[-1]
    # submitit fills the job's folder in from the job's environment, as its own command is about to
    os.environ["SUBMITIT_FOLDER"] = folder
    from submitit import JobEnvironment

    try:
        paths = JobEnvironment().paths
    except RuntimeError as exc:  # not started by submitit: no job environment to read the job's folder from
        print(f"error: python -m hpc.unpickle runs inside a submitit job only ({exc})", file=sys.stderr)
        return 2
    exposed = writable_by_others(fixed_part(folder), paths.folder, paths.submitted_pickle)
    if exposed:
        print(f"error: {exposed[0]} could have been written by another user ({exposed[1]}), and this job would "
              f"unpickle {paths.submitted_pickle} (it could run their code); make it yours alone "
              f"(chmod go-w {exposed[0]}) and submit again", file=sys.stderr, flush=True)
        return 2
    os.execv(sys.executable, [sys.executable, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
