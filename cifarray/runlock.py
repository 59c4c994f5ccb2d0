"""One live run per folder: `python -m cifarray.train` and `python -m cifarray.tune` hold a lock on --out.

Two runs writing one folder corrupt each other (one rotates away the checkpoints the other
resumes from, both append to metrics.csv and bump attempts.json). So each CLI takes
`OUT/cifarray.lock` before it writes anything and holds it until it exits:

- The lock file names its holder: host, PID, the process's start time (to tell a reused PID
  from the holder), the command, the Slurm job and restart count, and when it was taken. It is
  taken atomically with `flock` (and a check that the locked file is still the lock file), so
  of two runs started together exactly one gets it; the holder refreshes its mtime every minute.
- A holder on this host that is provably gone (no such PID, or the PID now belongs to a
  process started at another time) is taken over, with a note.
- A holder on another host cannot be checked from here. It is honoured until its heartbeat
  is older than `STALE_AFTER_S` (30 minutes), or until `--force-unlock`, except for one
  provable case: the same Slurm job at a lower restart count is this job before its requeue,
  and Slurm starts a requeued job only after the old one has ended.

Where the file system does not support `flock`, the same rules apply to the file's content
alone (two runs started within the same instant could then both start).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from cifarray.errors import UserError

LOCK_NAME = "cifarray.lock"
STALE_AFTER_S = 30 * 60  # a lock of another host without a heartbeat for this long is taken over
HEARTBEAT_S = 60.0


class FolderLocked(UserError):
    """Another live run holds the folder."""


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = process_start(pid)
    return start is None or now is None or now == start  # another start time: the PID was reused


def this_holder(command: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "started": time.time(), "command": command, "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}


def describe(holder: dict, age: float | None = None) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    slurm = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
    return f"{holder.get('command') or 'a run'} (host {holder.get('host')}, pid {holder.get('pid')}{slurm}, " \
           f"started {when}{beat})"


class RunLock:
    """`with RunLock(out, "cifarray.train"):` holds OUT/cifarray.lock; raises FolderLocked if it is held.

    A folder the lock created is removed again on release if nothing else was written into it, so
    that an input error found after locking leaves no trace.
    """

    def __init__(self, folder: str | Path, command: str, force: bool = False, stale_after: float = STALE_AFTER_S,
                 heartbeat: float = HEARTBEAT_S):
        self.folder = Path(folder).expanduser().resolve()
        self.path = self.folder / LOCK_NAME
        self.command, self.force, self.stale_after, self.heartbeat = command, force, stale_after, heartbeat
        self._fd: int | None = None
        self._created: list[Path] = []
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--out {self.folder} exists and is not a folder; choose another --out")
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first
        try:
            self._acquire()
        except BaseException:
            self._remove_created()
            raise

    def _acquire(self) -> None:
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise FolderLocked(f"{self.folder} is in use by {describe(holder) if holder else 'another run'}; "
                                   "wait for it to end, or pass another --out") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                # no flock on this file system: the content alone decides (see the module docstring)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # a holder released (and unlinked) it between our open and flock: look again
                os.close(fd)
                continue
            try:
                holder = self._read(fd)
                if holder:
                    self._judge(holder, time.time() - os.fstat(fd).st_mtime)
                data = json.dumps(this_holder(self.command), indent=2).encode() + b"\n"
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._beat.start()
            return
        raise RuntimeError(f"could not take {self.path}: it kept changing")

    @staticmethod
    def _read(fd: int) -> dict | None:
        raw = os.pread(fd, 1 << 16, 0)
        try:
            holder = json.loads(raw) if raw.strip() else None
        except ValueError:
            return {"command": "an unreadable lock file"}
        return holder if isinstance(holder, dict) else None

    def _judge(self, holder: dict, age: float) -> None:
        """Return if the recorded holder is gone (after a note), raise FolderLocked if it may still run."""
        me = this_holder(self.command)
        who = describe(holder, age)
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
            if pid_alive(holder["pid"], holder.get("pid_start")):
                raise FolderLocked(f"{self.folder} is in use by {who}, which is still running on this host; "
                                   "wait for it to end or stop it, or pass another --out")
            why = "its process is gone"
        elif (holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]
              and int(holder.get("slurm_restart") or 0) < me["slurm_restart"]):
            why = "it was this Slurm job before its requeue, which Slurm ends before it restarts a job"
        elif self.force:
            why = "--force-unlock"
        elif age > self.stale_after:
            why = f"no heartbeat for {age / 60:.0f} min (limit {self.stale_after / 60:.0f} min)"
        else:
            raise FolderLocked(f"{self.folder} is in use by {who}; it cannot be checked from this host, so it is "
                               f"honoured until it has had no heartbeat for {self.stale_after / 60:.0f} min; if "
                               "that run is gone, rerun with --force-unlock, else pass another --out")
        print(f"note: taking over {self.path} from {who}: {why}", file=sys.stderr, flush=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self._fd)
            except (OSError, TypeError):
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._fd is not None:
            try:
                if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                    os.unlink(self.path)  # while still locked: a waiting opener then sees a different file
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for p in self._created:
            try:
                p.rmdir()  # only if empty: anything the run wrote stays
            except OSError:
                return
        self._created = []
