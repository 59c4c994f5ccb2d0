"""A real two-node Slurm (with accounting) on this one host, for the hpc tests.

Debian's munge, MariaDB, slurmdbd, slurmctld and two `slurmd -N nodeX` daemons, all under a
private folder with private sockets and ports, so that nothing of the machine's own is touched.
Daemons start under setsid; their PIDs are recorded and only those are stopped.

    python tests/slurmctl.py start DIR     # by hand: then  export SLURM_CONF=DIR/slurm.conf
    python tests/slurmctl.py stop DIR
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

# Fixed ports, outside both Ray's worker ports (10002-19999 by default: any Ray running on this host may hold one)
# and the kernel's ephemeral range (32768-60999 here).
NODES = {"node1": 27001, "node2": 27002}
CPUS_PER_NODE = 2
GPUS_PER_NODE = 1
MEM_PER_NODE = 6000
CTLD_PORT = 26817
PACKAGES = ("slurmctld", "slurmd", "sbatch", "munged", "mariadbd", "slurmdbd")


class SlurmUnavailable(RuntimeError):
    pass


def missing_programs() -> list[str]:
    paths = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in PACKAGES if shutil.which(p, path=paths) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.pids_file = self.root / "pids.json"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}

    # ---- start -------------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> "Slurm":
        if os.geteuid() != 0:
            raise SlurmUnavailable("the Slurm tests start daemons as root; run them as root (CI does)")
        missing = missing_programs()
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd "
                                   "slurm-client munge slurmdbd mariadb-server; .ci/run does)")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.pids: dict[str, int] = {}
        try:
            self._munge()
            self._mariadb(timeout)
            self._write_configs()
            self._spawn("slurmdbd", ["slurmdbd", "-D"], log="slurmdbd.out")
            self._wait_port(self.dbd_port, timeout, "slurmdbd")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], log="slurmctld.out")
            self._wait(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") >= 1, timeout,
                       "slurmctld")
            for node in NODES:
                self._spawn(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)], log=f"slurmd-{node}.out")
            self._wait(self._nodes_idle, timeout, "both slurmd nodes idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], log: str, user: str | None = None) -> None:
        if user:
            argv = ["runuser", "-u", user, "--"] + argv
        with open(self.root / log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True, cwd=self.root)
        self.pids[name] = proc.pid
        self.pids_file.write_text(json.dumps(self.pids))

    def _munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(exist_ok=True)
        munge = pwd.getpwnam("munge")
        os.chown(d, munge.pw_uid, munge.pw_gid)
        os.chmod(d, 0o755)  # munged insists that every client can reach its socket
        self.munge_socket = d / "munge.socket"
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--pid-file={d}/munged.pid",
                               f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                    log="munged.out", user="munge")
        self._wait(lambda: self.munge_socket.exists(), 20, "munged")

    def _mariadb(self, timeout: float) -> None:
        data = self.root / "mysql"
        self.db_socket = self.root / "mysql.sock"
        self.db_port = _free_port()
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True)
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={self.db_socket}",
                                 f"--port={self.db_port}", "--bind-address=127.0.0.1", "--user=root",
                                 f"--pid-file={self.root}/mysql.pid", f"--log-error={self.root}/mysql.err",
                                 "--innodb-buffer-pool-size=32M", "--skip-log-bin"], log="mariadbd.out")
        sql = ("CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        self._wait(lambda: subprocess.run(["mariadb", f"--socket={self.db_socket}", "-uroot", "-e", sql],
                                          capture_output=True).returncode == 0, timeout, "mariadbd")

    def _write_configs(self) -> None:
        host = socket.gethostname()
        self.dbd_port = _free_port()
        auth = f"AuthInfo=socket={self.munge_socket}"
        (self.root / "state").mkdir(exist_ok=True)
        dbd = self.root / "slurmdbd.conf"
        dbd.write_text(f"""AuthType=auth/munge
{auth}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={self.root}/slurmdbd.pid
LogFile={self.root}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
""")
        os.chmod(dbd, 0o600)
        # One fake GPU per node: Slurm only stats the device file, so a character device made with mknod
        # lets jobs ask for --gpus-per-node=1 and get SLURM_GPUS_ON_NODE, as on a GPU cluster.
        dev = self.root / "dev"
        dev.mkdir(exist_ok=True)
        gpu = dev / "fakegpu0"
        if not gpu.exists():
            os.mknod(gpu, 0o666 | stat.S_IFCHR, os.makedev(195, 0))
        (self.root / "gres.conf").write_text(f"NodeName={','.join(NODES)} Name=gpu File={gpu}\n")
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} "
            f"RealMemory={MEM_PER_NODE} Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN" for n, port in NODES.items())
        self.conf.write_text(f"""ClusterName=cifarray
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
{auth}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool-%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
EnforcePartLimits=ALL
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.dbd_port}
AccountingStoragePass={self.munge_socket}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
GresTypes=gpu
KillWait=30
MinJobAge=600
InactiveLimit=0
Waittime=0
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in NODES)

    def _wait(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            for name, pid in self.pids.items():
                if not _alive(pid):
                    raise SlurmUnavailable(f"{name} exited while waiting for {what}; logs in {self.root}")
            time.sleep(0.3)
        raise SlurmUnavailable(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.root}")

    def _wait_port(self, port: int, timeout: float, what: str) -> None:
        def up():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        self._wait(up, timeout, what)

    # ---- use ---------------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, capture_output=True, text=True, env=kw.pop("env", self.env), **kw)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_state(self, job_id: str) -> str:
        out = self.run(["scontrol", "show", "job", job_id], check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {state} after {timeout}s, wanted {sorted(states)}")

    # ---- stop --------------------------------------------------------------------------------
    def drain(self, timeout: float = 120) -> None:
        """Cancel every job and wait until Slurm has cleaned them up: a slurmstepd outlives its slurmd."""
        self.run(["scancel", "--full", "--user", "root"], check=False)
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
            time.sleep(1)

    def stop(self) -> None:
        pids = getattr(self, "pids", None)
        if pids is None and self.pids_file.exists():
            pids = json.loads(self.pids_file.read_text())
        # All at once (one at a time took ~28 s, each daemon saving its state): nothing here outlives the
        # test cluster, so nothing needs the others' state on the way down. Reverse start order: slurmds,
        # slurmctld, slurmdbd, mariadbd, munged.
        order = list(reversed(list((pids or {}).values())))
        for pid in order:
            _signal(pid, signal.SIGTERM)
        for pid in order:
            _stop(pid)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _stop(pid: int, grace: float = 15) -> None:
    """SIGTERM the daemon's own session (it was started with setsid), then SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace
    while time.monotonic() < end and _alive(pid):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while _alive(pid) and time.monotonic() < end + 5:
        time.sleep(0.1)


if __name__ == "__main__":
    cmd, root = sys.argv[1], Path(sys.argv[2])
    if cmd == "start":
        s = Slurm(root).start()
        print(f"export SLURM_CONF={s.conf}")
    else:
        Slurm(root).stop()
