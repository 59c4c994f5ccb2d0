"""hpc/ against a real two-node Slurm (tests/slurmctl.py starts munge, MariaDB, slurmdbd, slurmctld and
two slurmd on this host): per-job Ray clusters from sbatch and submitit, requeue, token auth, ports."""

from __future__ import annotations

import csv
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, digest, snapshot_status
from slurmctl import Slurm, SlurmUnavailable

from hpc import ray_cluster, submit
from hpc.slurm import gpus_on_node

PY = sys.executable
pytestmark = pytest.mark.slow


# ---- without Slurm ---------------------------------------------------------------------------------------
def test_gpus_on_node_reads_what_slurm_sets_for_gpus_and_gres_requests():
    assert gpus_on_node({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_TASK": ""}) == 4  # --gres=gpu:4
    assert gpus_on_node({"SLURM_JOB_GPUS": "0,2,3"}) == 3  # older Slurm
    assert gpus_on_node({"SLURM_GPUS_ON_NODE": " "}) == 0
    assert gpus_on_node({}) == 0


STRAGGLER = """
import os, sys, time
tmp = sys.argv[1]
open(os.path.join(tmp, "ready"), "w").close()
while os.path.exists(tmp):
    time.sleep(0.005)
os.makedirs(os.path.join(tmp, "session_x", "logs"))
time.sleep(60)
"""


def test_ray_temp_dir_is_a_fresh_private_folder_and_unsafe_places_are_refused(tmp_path, monkeypatch, request):
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    base = root / "b"
    base.mkdir(mode=0o755)
    monkeypatch.setenv("HPC_RAY_TMP", str(base))
    # What another user of the node could plant beforehand at the names a job's temp dirs used to have.
    planted = base / "ray-12-head"
    planted.mkdir(mode=0o777)
    (base / "ray-12-node2").symlink_to(tmp_path / "elsewhere")
    ray_dirs = [ray_cluster.temp_dir("12", 0) for _ in range(3)]  # Ray's --temp-dir, which Ray makes mode 777 ...
    made = [d.parent for d in ray_dirs]  # ... inside a private root of its own
    assert all(d.is_dir() and d.name == ray_cluster.RAY_DIR for d in ray_dirs)
    assert len(set(made)) == 3 and all(d.parent == base and d.is_dir() and not d.is_symlink() for d in made)
    assert all(d.name.startswith("ray-12-r0-") and len(d.name) == len("ray-12-r0-") + 8 for d in made)
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == os.getuid() for d in made)
    assert not any(planted.iterdir()) and not (tmp_path / "elsewhere").exists()
    assert len(str(ray_dirs[2])) + ray_cluster.SESSION_SUFFIX <= ray_cluster.SOCKET_PATH_MAX
    ray_cluster.remove_temp_dir(ray_dirs[2])
    assert not made[2].exists()
    # A process of the node that outlived its `ray start` (Ray's Prometheus service-discovery writer, in a dashboard
    # module process) writes into the session folder while the first pass empties it: the root is still removed.
    session = ray_dirs[1] / "session_x"
    session.mkdir()
    passes, rmtree = [], shutil.rmtree

    def racing_rmtree(path, ignore_errors=False):
        passes.append(path)
        rmtree(path, ignore_errors=ignore_errors)
        if len(passes) == 1:  # the folder as that pass left it: emptied, and one file written meanwhile
            session.mkdir(parents=True)
            (session / "tmp_prom_metrics_service_discovery.json").write_text("")

    with monkeypatch.context() as patched:
        patched.setattr(ray_cluster.shutil, "rmtree", racing_rmtree)
        ray_cluster.remove_temp_dir(ray_dirs[1])
    assert not os.path.lexists(made[1]) and passes == [made[1]] * 2
    # A Ray process still starting when its node stopped remakes its temp dir as it starts (Ray's Node._init_temp):
    # here one that waits for the removal, then makes the folders. The processes that name the temp dir are ended
    # first; another process, which does not, is left alone.
    straggler = subprocess.Popen([PY, "-c", STRAGGLER, str(ray_dirs[0])])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        wait_for(lambda: (ray_dirs[0] / "ready").exists(), 30, "the straggler")
        ray_cluster.remove_temp_dir(ray_dirs[0])
        assert straggler.wait(10) == -signal.SIGKILL and bystander.poll() is None
        time.sleep(0.5)
        assert not os.path.lexists(made[0])
    finally:
        for proc in (straggler, bystander):
            proc.kill()
            proc.wait()
    # A requeued run (restart 1) removes its job's earlier temp dirs on the node (a SIGKILLed teardown leaves them),
    # and nothing else: not another user's folder, not a link, not another job's, not its own run's.
    others = base / "ray-12-r0-NOBODY12", base / "ray-12-r0-alinkxyz", base / "ray-123-r0-otherjob"
    others[0].mkdir(mode=0o700)
    os.chown(others[0], 65534, 65534)  # the tests run as root (Slurm's daemons): another user's, as nobody
    others[1].symlink_to(made[0])
    others[2].mkdir(mode=0o700)
    now = ray_cluster.temp_dir("12", 1)
    assert not any(d.exists() for d in made) and all(os.path.lexists(p) for p in others)
    assert ray_cluster.temp_dir("12", 1) != now and now.is_dir()  # the same run's other node on this host: kept

    shared = root / "s"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: others may write, but not move what is not theirs
    monkeypatch.setenv("HPC_RAY_TMP", str(shared))
    assert ray_cluster.temp_dir("12", 0).parent.parent == shared
    (root / "a-file").write_text("")
    (root / ("x" * 60)).mkdir()
    for value, expected in ((root / "a-file", "is not a folder"), (root / "missing", "cannot be used"),
                            (root / ("x" * 60), "too long for Ray's socket paths")):
        monkeypatch.setenv("HPC_RAY_TMP", str(value))
        with pytest.raises(ray_cluster.UserError, match=f"{expected}.*HPC_RAY_TMP|HPC_RAY_TMP.*{expected}"):
            ray_cluster.temp_dir("12", 0)
    shared.chmod(0o777)  # others may write and move things: refused, naming the fix
    monkeypatch.setenv("HPC_RAY_TMP", str(shared))
    with pytest.raises(ray_cluster.UserError, match=r"written by other users and has no sticky bit.*chmod go-w"):
        ray_cluster.temp_dir("12", 0)


def test_a_job_folder_is_private_and_one_someone_else_planted_is_refused(tmp_path):
    jobs = tmp_path / "jobs"
    token = ray_cluster.new_token(jobs / "7")
    assert stat.S_IMODE((jobs / "7").stat().st_mode) == 0o700 and stat.S_IMODE(token.stat().st_mode) == 0o600
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (jobs / "8").symlink_to(theirs)
    (jobs / "9").mkdir()
    os.chown(jobs / "9", 65534, -1)
    for job, why in (("8", "a link"), ("9", "owned by uid 65534")):
        with pytest.raises(ray_cluster.UserError, match=f"job folder {jobs / job} is {why}, made by someone else"):
            ray_cluster.new_token(jobs / job)
    assert list(theirs.iterdir()) == [] and list((jobs / "9").iterdir()) == []
    assert stat.S_IMODE(theirs.stat().st_mode) != 0o700


def test_token_auth_is_said_on_only_when_the_head_enforces_it():
    """A head that serves requests without the token (a Ray before 2.52, or token auth switched off) stops the job;
    one that says "token" and refuses a tokenless request passes."""
    import http.server
    import threading

    answers = {}

    class Head(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            has_token = self.headers.get("Authorization") == "Bearer secret"
            if self.path == "/api/authentication_mode":
                code, body = 200, {"authentication_mode": answers["mode"]}
            else:
                code, body = (200 if has_token else answers["tokenless"]), {"ray_version": "2.x"}
            self.send_response(code)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        head = ray_cluster.Dashboard(f"http://127.0.0.1:{server.server_port}", "secret")
        answers.update(mode="token", tokenless=401)
        ray_cluster.check_token_auth(head)
        for mode, tokenless, said in (("disabled", 200, "authentication mode disabled; a request without the token "
                                       "got HTTP 200"), ("token", 200, "got HTTP 200, not HTTP 401"),
                                      ("disabled", 401, "authentication mode disabled")):
            answers.update(mode=mode, tokenless=tokenless)
            with pytest.raises(ray_cluster.UserError, match="does not enforce its token") as err:
                ray_cluster.check_token_auth(head)
            assert said in str(err.value) and "ray>=2.60" in str(err.value)
    finally:
        server.shutdown()


def test_a_bad_hpc_ray_tmp_stops_the_job_in_one_line_before_anything_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    (tmp_path / "a-file").write_text("")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    for value, expected in ((tmp_path / "a-file", "is not a folder"), (open_dir, "no sticky bit")):
        jobs = tmp_path / f"jobs-{len(expected)}"
        env.update(SLURM_JOB_ID="bad-tmp", SLURM_JOB_NODELIST="localhost", SLURM_CPUS_ON_NODE="1",
                   HPC_JOBS_DIR=str(jobs), HPC_RAY_TMP=str(value))
        proc = subprocess.run([PY, "-m", "hpc.ray_cluster", "--", PY, "-c", "print('DRIVER RAN')"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(said) == 1 and said[0].startswith("error: ") and expected in said[0], \
            proc.stdout + proc.stderr
        assert "DRIVER RAN" not in proc.stdout and "Ray" not in proc.stdout  # no Ray started
        assert not (jobs / "bad-tmp" / ray_cluster.TOKEN_FILE).exists()
    assert sorted(p.name for p in open_dir.iterdir()) == []


def test_a_submitit_folder_other_users_can_write_is_refused_before_anything_is_written(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, -1, 65534)  # a group of others (nogroup), not the user's own private group
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for mode, why in ((0o777, "mode 0777: writable by every user"), (0o1777, "mode 1777: writable by every user"),
                      (0o775, "mode 0775: writable by group 65534")):
        shared.chmod(mode)
        proc = subprocess.run([PY, "-m", "hpc.submit", "--executor", "local", "--folder", f"{shared}/submitit/%j", "--",
                               "true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(said) == 1, proc.stdout + proc.stderr
        assert said[0] == (f"error: --folder: {shared} could have been written by another user ({why}), and the job "
                           f"unpickles what submitit writes there; make it private (chmod go-w {shared}) or pass a "
                           "--folder of your own"), said
        assert list(shared.iterdir()) == []


class Planted:
    """A pickle that runs code when it is loaded: what another user could leave where a job unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_submitit_job_checks_its_folder_on_the_node_before_it_unpickles_anything(tmp_path):
    """hpc.submit starts a submitit job through hpc.unpickle: a job folder or pickle that became another user's to
    write after the submission stops the job in one line, and nothing is unpickled; a private one runs submitit."""
    import pickle

    folder, marker = tmp_path / "submitit", tmp_path / "ran"
    job = folder / "42"
    job.mkdir(parents=True)
    pickled = job / "42_submitted.pkl"
    pickled.write_bytes(pickle.dumps(Planted(marker)))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))},
           "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "42", "SUBMITIT_LOCAL_GLOBALID": "0"}
    command = ["-u", "-m", "submitit.core._submit", f"{folder}/%j"]
    assert submit.GUARDED_PYTHON.split()[1:] == ["-m", "hpc.unpickle"]

    def start():
        return subprocess.run([PY, "-m", "hpc.unpickle", *command], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)

    for path, change, why in ((job, lambda: job.chmod(0o777), "mode 0777: writable by every user"),
                              (folder, lambda: folder.chmod(0o757), "mode 0757: writable by every user"),
                              (pickled, lambda: os.chown(pickled, 65534, -1), "owned by uid 65534")):
        change()
        proc = start()
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(said) == 1, proc.stderr
        assert said[0].startswith(f"error: {path} could have been written by another user ({why}), and this job "
                                  f"would unpickle {pickled}"), said
        assert not marker.exists()
        job.chmod(0o755), folder.chmod(0o755), os.chown(pickled, os.getuid(), -1)
    start()  # private again: submitit's own command runs and unpickles the file (which is how the planted code runs)
    assert marker.exists()


def test_kept_logs_are_regular_files_only_never_through_a_link_and_capped(tmp_path, monkeypatch, capsys):
    logs = tmp_path / "tmp" / "session_2026-12-04_01-00-00_000000_1" / "logs"
    (logs / "events").mkdir(parents=True)
    (logs / "raylet.out").write_text("raylet\n")
    (logs / "events" / "event_GCS.log").write_text("gcs\n")
    (logs / "worker-1.out").write_bytes(b"x" * 3_000_000)  # over the cap below, once the others are in
    (logs / "zero.log").symlink_to("/dev/zero")  # a copy through it would never end
    secret = tmp_path / "someone-elses"
    secret.mkdir()
    (secret / "id_rsa").write_text("private")
    (logs / "more").symlink_to(secret)  # a link to a folder is not entered
    os.mkfifo(logs / "pipe.log")  # opening it to read would block
    monkeypatch.setattr(ray_cluster, "KEEP_LOGS_CAP_MB", 2)
    t = time.monotonic()
    ray_cluster.keep_logs(tmp_path / "tmp", tmp_path / "job", "node1", 0)
    assert time.monotonic() - t < 10
    kept = tmp_path / "job" / ray_cluster.LOGS_DIR / "node1"
    copied = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if not p.is_dir())
    assert copied == [ray_cluster.NOT_KEPT, "events/event_GCS.log", "raylet.out"]
    assert not any(p.is_symlink() for p in kept.rglob("*"))
    note = (kept / ray_cluster.NOT_KEPT).read_text()
    for line in ("zero.log (a link)", "more (a link)", "pipe.log (not a regular file)",
                 "worker-1.out (3.0 MB: over the 2 MB cap)"):
        assert line in note, note
    out = capsys.readouterr().out
    assert f"node1's Ray logs kept in {kept} (0.0 MB); 4 left out, listed in {kept / ray_cluster.NOT_KEPT}" in out


def test_cli_errors_are_one_line_without_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for argv, expected in ((["hpc.ray_cluster", "--", "true"], "not inside a Slurm job"),
                           (["hpc.ray_cluster"], "no command given"),
                           (["hpc.submit", "--nodes", "0", "--", "true"], "--nodes must be at least 1"),
                           (["hpc.status", "424242"], "no Ray cluster recorded for job 424242")):
        proc = subprocess.run([PY, "-m", *argv], cwd=REPO, env={**env, "HPC_JOBS_DIR": str(tmp_path)},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_local_executor_runs_a_trainer_sized_by_workers_auto_on_its_own_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["HPC_JOBS_DIR"] = str(tmp_path / "jobs")
    run = tmp_path / "run"
    proc = subprocess.run([PY, "-m", "hpc.submit", "--executor", "local", "--folder", str(tmp_path / "submitit/%j"),
                           "--", PY, "-m", "cifarray.train", "densenet", "--synthetic", "--steps", "20",
                           "--batch-size", "64", "--augment", "basic", "--workers", "auto", "--out", str(run),
                           "--synthetic-train-per-class", "20", "--synthetic-test-per-class", "5", "--val-size", "200",
                           "--eval-every", "10", "--log-every", "10",
                           # a tiny model: what is tested is the job's cluster, not the paper DenseNet's CPU time
                           "--growth-rate", "4", "--blocks", "1,1", "--init-channels", "8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = proc.stdout.split("submitted job ")[1].split()[0]
    log = next((tmp_path / "submitit" / job).glob("*_0_log.out")).read_text()
    assert "--workers auto: 1 worker(s), one per node, on CPU" in log, log[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers"] == 1 and summary["steps"] == 20 and summary["slurm_node"] is None
    info = json.loads((tmp_path / "jobs" / f"local-{job}" / ray_cluster.CLUSTER_FILE).read_text())
    assert info["state"] == "ended" and oct(Path(info["token_file"]).stat().st_mode & 0o777) == "0o600"


# A port that free_ports picked can be bound by another process before Ray binds it (CI saw a job's head
# die so). Here the head's first dashboard port is held by this script: `ray start` fails on it, and the
# launcher must start the head again on new ports.
TAKEN_DASHBOARD_PORT = """
import socket, sys
from hpc import ray_cluster, submit
taken = socket.socket()
taken.bind(("", 0))
taken.listen()
real, calls = ray_cluster.free_ports, []
def free_ports(n):
    ports = real(n)
    names = ray_cluster.NODE_PORTS + ray_cluster.HEAD_PORTS + ray_cluster.HEAD_PORT_VARS
    if not calls and n == len(names):
        ports[names.index("--dashboard-port")] = taken.getsockname()[1]
    calls.append(n)
    return ports
ray_cluster.free_ports = free_ports
ray_cluster.run_cli(ray_cluster.main, sys.argv[1:])
"""


def test_a_ray_head_whose_port_was_taken_meanwhile_starts_again_on_new_ports(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="local-retry", SLURM_JOB_NODELIST="localhost", SLURM_CPUS_ON_NODE="1",
               HPC_JOBS_DIR=str(tmp_path))
    proc = subprocess.run([PY, "-c", TAKEN_DASHBOARD_PORT, "--", PY, "-c", "print('DRIVER RAN')"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DRIVER RAN" in proc.stdout and "Ray cluster up" in proc.stdout
    assert "the Ray head failed to start (ValueError: Failed to bind to" in proc.stdout, proc.stdout[-3000:]
    assert "retrying with new ports (attempt 2 of 3)" in proc.stdout and "attempt 3" not in proc.stdout
    assert json.loads((tmp_path / "local-retry" / ray_cluster.CLUSTER_FILE).read_text())["state"] == "ended"


def test_a_worker_whose_ray_start_fails_before_joining_tries_again_then_gives_up(tmp_path, monkeypatch, capsys):
    # join_cluster's loop without Ray: each "ray start" writes its output to the node's log and exits.
    for name, value in dict(SLURM_JOB_ID=f"test{os.getpid()}", SLURM_JOB_NODELIST="node2", SLURMD_NODENAME="node2",
                            SLURM_CPUS_ON_NODE="1", HPC_RAY_TMP="/tmp").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ray_cluster, "_ignore_stop_signals", lambda: None)  # not in pytest's own process
    monkeypatch.setattr(ray_cluster, "node_ip", lambda node: "127.0.0.1")
    outcomes: list[tuple[str, int]] = []

    def start_node(*, log_file, **kwargs):
        output, code = outcomes[len(starts)]
        starts.append(kwargs)
        with open(log_file, "a") as fh:
            fh.write(f"Usage stats collection is disabled.\n{output}\n")
        return subprocess.Popen([PY, "-c", f"raise SystemExit({code})"]), {}

    monkeypatch.setattr(ray_cluster, "start_node", start_node)
    busy = ("RuntimeError: Failed to start GCS. Address already in use", 1)
    for script, expected_code, expected_starts in (
            ([busy, (f"{ray_cluster.STARTED}.", 3)], 3, 2),  # up, then died later: that is not retried
            ([busy, busy, busy], 1, 3)):
        starts: list[dict] = []
        outcomes[:] = script
        assert ray_cluster.join_cluster(tmp_path, "127.0.0.1:1", "http://127.0.0.1:2", 5) == expected_code
        assert len(starts) == expected_starts
        out = capsys.readouterr().out
        assert f"the Ray worker on node2 failed to start ({busy[0]}); retrying with new ports (attempt 2 of 3)" in out
        assert ("attempt 3 of 3" in out) == (expected_starts == 3)


# ---- a real Slurm ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    root = Path(f"/tmp/cifarray-slurm-{os.getpid()}")  # short: munge and MariaDB sockets live here
    try:
        cluster = Slurm(root).start()
    except SlurmUnavailable as exc:
        if os.environ.get("CI"):
            raise  # CI installs Slurm (.ci/run): never skip the real-component tests there
        pytest.skip(str(exc))
    jobs = tmp_path_factory.mktemp("hpc-jobs")
    cluster.jobs_dir = jobs
    cluster.job_env = {**cluster.env, "HPC_JOBS_DIR": str(jobs), "PYTHON": PY,
                       "PATH": f"{Path(PY).parent}:{cluster.env['PATH']}"}
    yield cluster
    cluster.drain()
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def sbatch(slurm: Slurm, *args: str, env: dict | None = None) -> str:
    proc = slurm.run(["sbatch", "--parsable", f"--chdir={REPO}", *args], env={**slurm.job_env, **(env or {})})
    return proc.stdout.strip().split(";")[0]


def wait_for(cond, timeout: float, what: str, interval: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {what}")


def cluster_info(slurm: Slurm, job: str, jobs_dir: Path | None = None) -> dict | None:
    try:
        return json.loads(((jobs_dir or slurm.jobs_dir) / job / ray_cluster.CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return None


def job_logs(slurm: Slurm, job: str, chars: int = 3000, jobs_dir: Path | None = None) -> str:
    """The ends of a job's own output and of its Ray nodes' logs: what a failed assertion should show."""
    out = slurm.run(["scontrol", "show", "job", job], check=False).stdout
    files = [Path(f.split("=", 1)[1]) for f in out.split() if f.startswith("StdOut=")]
    files += sorted(((jobs_dir or slurm.jobs_dir) / job).glob("ray-*.log"))
    parts = []
    for path in files:
        try:
            parts.append(f"==> {path} <==\n{path.read_text(errors='replace')[-chars:]}")
        except OSError as exc:
            parts.append(f"==> {path} <== {exc}")
    return "\n".join(parts)


def running_cluster(slurm: Slurm, job: str, timeout: float = 120, jobs_dir: Path | None = None) -> dict:
    def up():
        info = cluster_info(slurm, job, jobs_dir)
        if slurm.job_state(job) in ("FAILED", "COMPLETED", "CANCELLED"):
            logs = job_logs(slurm, job, jobs_dir=jobs_dir)
            raise AssertionError(f"job {job} ended before its Ray cluster ran\n{logs}")
        return info if info and info.get("state") == "running" else None
    return wait_for(up, timeout, f"the Ray cluster of job {job}")


def http_status(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


BOTH_RUNS = ("node1", "node2", "node1-restart1", "node2-restart1")  # a two-node job's nodes, run 0 and requeued


def raylet_logs(kept: Path, node: str) -> list[Path]:
    """The raylet log hpc.ray_cluster.keep_logs kept of one node's run (one folder per `ray start` attempt when the
    node needed more than one)."""
    return [*(kept / node).glob("raylet.out"), *(kept / node).glob("session_*/raylet.out")]


def test_a_two_node_sweep_of_ddp_trials_spans_both_nodes_and_a_requeued_one_resumes(slurm, tmp_path):
    """Two DDP workers per trial, one on each node (a node has one CPU): TorchTrainer trials, gloo across the
    nodes, and the job requeued mid-sweep.

    In-actor trials across Slurm nodes are test_a_sweep_grows_onto_a_node_freed_later_...'s, whose 800-step trials
    are waited on until one runs on node2. A variant of this test with 60-step in-actor trials asked all four to
    span both nodes and failed once in CI with all on node1: Tune hands a staged trial to a cached actor when the
    actor requested for it has not started yet (tune_controller._maybe_reuse_cached_actor), so a trial shorter than
    an actor's start on a loaded machine leaves the other node idle, as it should."""
    out = tmp_path / "tune"
    log = tmp_path / "job.out"
    text = (REPO / "sweeps" / "ci_cluster.toml").read_text()
    sweep = str(tmp_path / "ci_cluster.toml")
    # One DDP trial at a time (each takes both nodes' one CPU, 20-50 s): one finished before the requeue, the other
    # (mid-training when Tune's snapshot holds the first, 10 s or more after it) in the requeued job. A third, and
    # before it a fourth, each added ~40 s to the suite and nothing to the test.
    n_trials = 2
    Path(sweep).write_text(text.replace("trials = 4", f"trials = {n_trials}"))
    # The script's own header asks for a GPU per node (fake ones here: tests/slurmctl.py); the trials train
    # on CPU (GPUS_PER_TRIAL=0) because this machine's GPUs are only device files.
    started = time.time()
    job = sbatch(slurm, "--nodes=2", "--cpus-per-task=1", f"--output={log}", "slurm/tune_densenet.sh",
                 "--workers-per-trial", "2",
                 env={"SWEEP": sweep, "SYNTHETIC": "1", "OUT": str(out), "GPUS_PER_TRIAL": "0"})
    info = running_cluster(slurm, job)
    assert info["nodes"] == ["node1", "node2"] and info["cpus"] == 2 and info["gpus"] == 2

    # The dashboard answers while the sweep runs, with the job's token only.
    token = Path(info["token_file"]).read_text().strip()
    assert oct(Path(info["token_file"]).stat().st_mode & 0o777) == "0o600"
    code, body = http_status(info["dashboard_url"] + "/api/version", token)
    assert code == 200 and json.loads(body)["ray_version"]
    assert http_status(info["dashboard_url"] + "/api/version")[0] == 401
    status = subprocess.run([PY, "-m", "hpc.status", job], cwd=REPO, env=slurm.job_env, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "2 of 2 node(s) alive" in status.stdout and "node1" in status.stdout and "node2" in status.stdout

    # Requeue once Tune has recorded a finished trial: the job comes back and resumes the same experiment.
    def completed():
        try:
            with open(out / "trials.csv") as f:
                return [r["trial_id"] for r in csv.DictReader(f) if r["status"] == "complete"]
        except OSError:
            return None
    first = wait_for(completed, 300, "a completed trial")
    # Requeued once Tune's experiment snapshot (Tune's adaptive period: 10 s or more) holds them as finished.
    wait_for(lambda: all(snapshot_status(out, t) == "TERMINATED" for t in first), 60, "Tune's snapshot of them")
    before = {t: digest(out / "trials" / t / "metrics.csv") for t in first}
    slurm.run(["scontrol", "requeue", job])
    slurm.wait_state(job, {"PENDING"}, 120)
    slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])  # Slurm holds a requeued job 120 s
    wait_for(lambda: (cluster_info(slurm, job) or {}).get("restart_count") == 1, 180, "the requeued job's cluster")
    state = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 420)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]

    # The log says how to continue the sweep in a later job (a fresh sbatch gets a new default OUT).
    assert f"to continue this sweep in a later job: SYNTHETIC=1 OUT={out} sbatch slurm/tune_densenet.sh" in text
    assert f"watch the study: optuna-dashboard {out.resolve()}/optuna.journal" in text
    runs = text.split("Ray cluster up")
    assert len(runs) == 3 and "resuming" in runs[-1], text[-3000:]
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_trials and all(r["status"] == "complete" for r in rows), rows
    for trial, h in before.items():  # finished before the requeue: neither restarted nor trained again
        assert f"trial {trial} started" not in runs[-1]
        assert digest(out / "trials" / trial / "metrics.csv") == h
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["test_acc"] is not None
    finished = sorted(p.parent for p in (out / "trials").glob("*/summary.json"))
    summaries = [json.loads((d / "summary.json").read_text()) for d in finished]
    assert len(summaries) == n_trials and {(s["workers"], s["runner"]) for s in summaries} == {(2, "ray-train")}
    for d in finished:  # each trial's two ranks trained on the two Ray nodes
        nodes = {json.loads((d / "workers" / f"rank{r}.json").read_text())["slurm_node"] for r in (0, 1)}
        assert nodes == {"node1", "node2"}, (d, nodes)
    assert not [p for p in Path("/tmp").glob(f"ray-{job}-r*") if p.stat().st_mtime >= started], \
        "Ray temp dirs left behind"  # (job ids start again at 1 with each test Slurm: older ones may be there)
    # ... but each node's Ray logs, of both runs of the job, are kept in its folder.
    kept = slurm.jobs_dir / job / ray_cluster.LOGS_DIR
    for node in BOTH_RUNS:
        assert raylet_logs(kept, node), (node, sorted(str(p.relative_to(kept)) for p in kept.rglob("*")))
        # (the head copies them once its driver has stopped, and again once it has: Slurm may SIGKILL it between)
        assert re.search(rf"{node.split('-')[0]}'s Ray logs( \(so far\))? kept in {re.escape(str(kept / node))} ",
                         text), node
    # A requeued run took the folder's lock (the old run had released it, or was provably gone)
    # and released it when it ended.
    assert "is in use by" not in text and not (out / "cifarray.lock").exists()


DRIVER = """
import json, os, sys, time, ray
ray.init()
print("DRIVER", json.dumps({"nodes": len([n for n in ray.nodes() if n["Alive"]]),
                             "cpus": ray.cluster_resources().get("CPU")}), flush=True)
release = sys.argv[1] if len(sys.argv) > 1 else None
while release and not os.path.exists(release):
    time.sleep(0.5)

@ray.remote
def state_api():  # from a Ray worker, as Ray Train's placement-group cleaner does
    from ray.util.state import list_nodes
    return len(list_nodes())

print("STATE_API", ray.get(state_api.remote()), flush=True)
"""


def test_every_sbatch_script_is_accepted_by_slurm_with_its_own_headers(slurm):
    for script in sorted((REPO / "slurm").glob("*.sh")):
        for extra in ([], ["--nodes=2", "--gpus-per-node=0"]):  # as shipped (1 GPU per node), and CPU-only
            proc = slurm.run(["sbatch", "--test-only", "--cpus-per-task=1", *extra, str(script)], check=False,
                             cwd=REPO)
            assert proc.returncode == 0 and "to start at" in proc.stderr, (script.name, extra, proc.stderr)


AUTH_PROBE = """
import json, sys
import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, ray_client_pb2, ray_client_pb2_grpc

gcs, client, token = sys.argv[1:4]

def code(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name

found = {}
for name, tok in (("none", None), ("wrong", "0" * 64), ("job", token)):
    md = [("authorization", f"Bearer {tok}")] if tok else []
    with grpc.insecure_channel(gcs) as ch:
        found[f"gcs/{name}"] = code(lambda: gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ch).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), metadata=md, timeout=20))
    with grpc.insecure_channel(client) as ch:
        found[f"client/{name}"] = code(lambda: ray_client_pb2_grpc.RayletDriverStub(ch).ClusterInfo(
            ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), metadata=md, timeout=20))
print(json.dumps(found))
"""


@pytest.fixture
def neighbour():
    """A second Unix user of the node, made for the test and removed after it: `neighbour.run(*cmd)` runs a command
    as that user, in no group of root's."""
    name = f"cifarray-nb{os.getpid()}"
    try:
        subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot make a second user here ({exc})")
    user = pwd.getpwnam(name)

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--",
                               *cmd], capture_output=True, text=True, timeout=60, cwd="/")

    yield SimpleNamespace(uid=user.pw_uid, gid=user.pw_gid, run=run)
    subprocess.run(["userdel", name], capture_output=True)


def test_two_jobs_on_one_node_share_nothing_and_a_hostile_neighbour_can_neither_read_nor_hijack_them(
        slurm, tmp_path, neighbour):
    """Two jobs' Ray clusters on one node, and another user of that node. Before the jobs start, that user plants
    what the old code would have used: a link at one job's old Ray temp-dir name (/tmp/ray-<job>-head) and a folder
    of theirs, mode 777, at the other (/tmp/ray-<job>-node1). The jobs start and end normally and never write
    there. While they run, the other user can read neither a job's folder (its token, cluster.json, logs; its parent
    is open to them) nor its Ray temp root, and cannot plant a link in its Ray logs. Ray's GCS, its Ray Client port,
    the dashboard and the Jobs API refuse a client without the job's token. Ray knows tokens, not Unix users: the
    other user asks the dashboard and the Jobs API themselves (curl), and a tokenless process of the test asks the
    gRPC ports (the interpreter of this test's environment, with grpc, may not be the other user's to run)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    release = tmp_path / "release"
    shared = Path(tempfile.mkdtemp(prefix="cifarray-nb-", dir="/tmp"))  # readable by all, as a home often is
    try:
        shared.chmod(0o755)
        jobs_dir, trap = shared / "jobs", shared / "trap"
        jobs_dir.mkdir(mode=0o755)
        assert neighbour.run("true").returncode == 0
        jobs = [sbatch(slurm, "--hold", "--nodes=1", "--nodelist=node1", "--cpus-per-task=1",
                       f"--output={tmp_path}/j{i}.out", "--wrap",
                       f"exec {PY} -m hpc.ray_cluster -- {PY} {driver} {release}",
                       env={"HPC_JOBS_DIR": str(jobs_dir)}) for i in range(2)]
        trap.mkdir(mode=0o777)
        os.chown(trap, neighbour.uid, neighbour.gid)
        planted = [Path(f"/tmp/ray-{jobs[0]}-head"), Path(f"/tmp/ray-{jobs[1]}-node1")]
        assert neighbour.run("ln", "-s", str(trap), str(planted[0])).returncode == 0
        assert neighbour.run("mkdir", "-m", "777", str(planted[1])).returncode == 0
        before = set(Path("/tmp").glob("ray-*"))  # an earlier test Slurm's job of the same id may have left its own
        for j in jobs:
            slurm.run(["scontrol", "release", j])
        infos = [running_cluster(slurm, j, jobs_dir=jobs_dir) for j in jobs]
        roots = [set(Path("/tmp").glob(f"ray-{j}-r0-*")) - before for j in jobs]
        check_two_jobs_share_nothing(slurm, jobs, infos, roots)
        check_a_neighbour_can_neither_read_nor_hijack(neighbour, jobs, infos, jobs_dir, shared, roots)
        release.touch()
        for i, j in enumerate(jobs):
            assert slurm.wait_state(j, {"COMPLETED", "FAILED", "CANCELLED"}, 120) == "COMPLETED", \
                job_logs(slurm, j, jobs_dir=jobs_dir)
            out = (tmp_path / f"j{i}.out").read_text()
            assert 'DRIVER {"nodes": 1, "cpus": 1.0}' in out, out[-2000:]
            assert "STATE_API 1" in out, out[-3000:]  # its own cluster's state API, not "multiple Ray instances"
            assert cluster_info(slurm, j, jobs_dir)["state"] == "ended"
            assert not [root for root in roots[i] if root.exists()]  # its private root is gone
            kept = jobs_dir / j / ray_cluster.LOGS_DIR
            assert list(kept.rglob("raylet.out")) and not [p for p in kept.rglob("*") if p.is_symlink()]
        # What the neighbour planted is as they left it: the job wrote nothing through their link or in their folder.
        assert planted[0].is_symlink() and os.readlink(planted[0]) == str(trap) and list(trap.iterdir()) == []
        assert planted[1].stat().st_uid == neighbour.uid and list(planted[1].iterdir()) == []
    finally:
        for path in planted if "planted" in locals() else ():
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)


def check_two_jobs_share_nothing(slurm: Slurm, jobs: list[str], infos: list[dict], roots: list[set[Path]]) -> None:
    assert all(slurm.job_state(j) == "RUNNING" for j in jobs)  # both at once, on node1
    ports = [set(i["ports"].values()) for i in infos]
    assert not ports[0] & ports[1], "two jobs on one node share ports"
    # What the two jobs' Ray processes listen on, read from the kernel: no port in common, none of Ray's fixed
    # defaults (the head's metrics endpoints included), and the dashboard on the node's address only.
    for found in roots:  # Ray's own folders (mode 777) sit in a private root: another user cannot even list them
        assert len(found) == 1, found
        root = next(iter(found))
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert list((root / ray_cluster.RAY_DIR).glob("session_*/sockets"))
    listening = [listeners(ray_processes_of(f"/tmp/ray-{j}-")) for j in jobs]
    used = [{port for _, port in sockets} for sockets in listening]
    assert all(used) and not used[0] & used[1], listening
    assert not (used[0] | used[1]) & {6379, 8265, 10001, 52365, 44217, 44227}, listening
    for info, sockets in zip(infos, listening):
        dashboard = int(info["dashboard_url"].rsplit(":", 1)[1])
        assert {addr for addr, port in sockets if port == dashboard} == {info["head_ip"]}, sockets
        assert {info["ports"]["dashboard-metric-port"], info["ports"]["autoscaler-metric-port"]} <= used[0] | used[1]
    tokens = [Path(i["token_file"]).read_text().strip() for i in infos]
    assert tokens[0] != tokens[1]
    for info, token, other in zip(infos, tokens, reversed(tokens)):
        url = info["dashboard_url"] + "/api/version"
        assert http_status(url, token)[0] == 200
        assert http_status(url)[0] == 401
        assert http_status(url, other)[0] == 403  # another job's token is not this one's


def check_a_neighbour_can_neither_read_nor_hijack(neighbour, jobs: list[str], infos: list[dict], jobs_dir: Path,
                                                  shared: Path, roots: list[set[Path]]) -> None:
    for j, info, found in zip(jobs, infos, roots):
        job_dir = jobs_dir / j
        assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
        root = next(iter(found))
        logs = root / ray_cluster.RAY_DIR / "session_latest" / "logs"
        assert (logs / "raylet.out").is_file()
        for cmd in (["ls", str(job_dir)], ["cat", info["token_file"]], ["cat", str(job_dir / ray_cluster.CLUSTER_FILE)],
                    ["cat", str(job_dir / "ray-head.log")], ["ls", str(root)], ["cat", str(logs / "raylet.out")],
                    ["ln", "-s", "/dev/zero", str(logs / "zero.log")]):
            tried = neighbour.run(*cmd)
            assert tried.returncode != 0 and "Permission denied" in tried.stderr, (cmd, tried.stdout, tried.stderr)
    assert neighbour.run("ls", str(jobs_dir)).returncode == 0  # what protects a job folder is its own mode

    # The control plane, without the job's token: the GCS, the Ray Client port, the dashboard and its Jobs API.
    info = infos[0]
    token = Path(info["token_file"]).read_text().strip()
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    probe = subprocess.run([PY, "-c", AUTH_PROBE, info["address"],
                            f"{info['head_ip']}:{info['ports']['ray-client-server-port']}", token],
                           env={**bare, "HOME": str(shared)}, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert json.loads(probe.stdout) == {f"{service}/{who}": ("OK" if who == "job" else "UNAUTHENTICATED")
                                        for who in ("none", "wrong", "job") for service in ("gcs", "client")}
    # The dashboard and its Jobs API, asked by the neighbour itself (with the system's curl: the interpreter of this
    # test's environment may sit where they cannot run it), a job submission included.
    hijacked = shared / "hijacked"
    submission = json.dumps({"entrypoint": f"touch {hijacked}"})
    for path, extra in (("/api/version", []), ("/api/jobs/", []),
                        ("/api/jobs/", ["-X", "POST", "-H", "Content-Type: application/json", "-d", submission])):
        asked = neighbour.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *extra,
                              info["dashboard_url"] + path)
        assert asked.stdout == "401", (path, extra, asked.stdout, asked.stderr)
    assert http_status(info["dashboard_url"] + "/api/jobs/", token)[0] == 200
    assert not hijacked.exists()


def test_submitit_job_requeues_on_its_signal_completes_and_a_cancelled_job_is_reported_cleanly(slurm, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    release = tmp_path / "release"
    common = [PY, "-m", "hpc.submit", "--executor", "slurm", "--cpus-per-node", "1", "--time", "10",
              "--folder", str(tmp_path / "submitit" / "%j")]
    waiting = subprocess.Popen([*common, "--nodes", "2", "--", PY, str(driver), str(release)], cwd=REPO,
                               env=slurm.job_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = waiting.stdout.readline().split("submitted job ")[1].split()[0]
        running_cluster(slurm, job)
        # The head counts node2 a moment before node2's `ray start` ends its start-up. Requeued in between, that
        # start-up waits on the stopped head and handles its SIGTERM ~30 s later, and Slurm (KillWait 30 s)
        # SIGKILLs the step first: the requeue took 30 s in every run, and node2's Ray logs were lost.
        worker_log = slurm.jobs_dir / job / "ray-worker-node2.log"
        wait_for(lambda: ray_cluster.STARTED in worker_log.read_text(), 60, "node2's Ray start")
        # submitit's pre-timeout/preemption signal: checkpoint() resubmits the same command and the job is requeued
        slurm.run(["scancel", "--signal=USR2", job])
        slurm.wait_state(job, {"PENDING"}, 120)
        slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])  # skip Slurm's 120 s requeue hold
        wait_for(lambda: (cluster_info(slurm, job) or {}).get("restart_count") == 1
                 and cluster_info(slurm, job)["state"] == "running", 180, "the requeued job's cluster")
        release.touch()
        stdout, stderr = waiting.communicate(timeout=180)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, stdout + stderr
    assert "completed: command exited with status 0" in stdout
    log = next((tmp_path / "submitit" / job).glob("*_0_log.out")).read_text()
    assert "requeueing" in log and log.count("Ray cluster up") == 2, log[-3000:]
    assert 'DRIVER {"nodes": 2, "cpus": 2.0}' in log.split("Ray cluster up")[2], log[-2000:]
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 120) == "COMPLETED"
    kept = slurm.jobs_dir / job / ray_cluster.LOGS_DIR  # each node kept its Ray logs, in both runs
    assert all(raylet_logs(kept, node) for node in BOTH_RUNS), sorted(str(p.relative_to(kept)) for p in kept.rglob("*"))

    waiting = subprocess.Popen([*common, "--nodes", "1", "--", PY, str(driver), str(tmp_path / "never")],
                               cwd=REPO, env=slurm.job_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = waiting.stdout.readline().split("submitted job ")[1].split()[0]
        running_cluster(slurm, job)
        slurm.run(["scancel", job])
        stdout, stderr = waiting.communicate(timeout=180)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 1, stdout + stderr
    assert f"job {job} was cancelled" in stderr and "Traceback" not in stderr, stderr


def test_hpc_imports_nothing_from_cifarray():
    # hpc/ is cluster plumbing: it must run where the ML package is not importable at all.
    code = ("import sys, hpc.ray_cluster, hpc.slurm, hpc.status, hpc.submit, hpc.errors; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cifarray'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def sbatch_script(*argv: str) -> str:
    """The sbatch script submitit writes for `python -m hpc.submit ARGV -- true` (no Slurm needed to render it)."""
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    from hpc import submit

    executor = submitit.AutoExecutor(folder="/tmp/unused", cluster="slurm")
    executor.update_parameters(**submit.slurm_parameters(submit.parser().parse_args([*argv, "--", "true"])))
    return _make_sbatch_string(command="true", folder="/tmp/unused", **executor._executor.parameters)


def test_submit_asks_slurm_for_the_cpus_a_node_needs(capsys):
    """Without -c Slurm gives the task one CPU, and the sweep then plans one trial at a time on a 4-GPU node."""
    assert "#SBATCH --cpus-per-task=8" in sbatch_script()  # what the slurm/*.sh scripts ask
    assert "#SBATCH --cpus-per-task=32" in sbatch_script("--cpus-per-node", "32")
    whole = sbatch_script("--exclusive")
    assert "#SBATCH --exclusive" in whole and "--cpus-per-task" not in whole  # every CPU of the node
    assert "warning" not in capsys.readouterr().err
    sbatch_script("--cpus-per-node", "2", "--gpus-per-node", "4")
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 1 and warned[0].startswith("warning: --cpus-per-node 2 is fewer than --gpus-per-node 4")


# ---- elastic sweeps: join jobs, drained and lost nodes -------------------------------------------------------
def test_join_refuses_what_it_cannot_join_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    not_sweep = tmp_path / "not-a-sweep"
    not_sweep.mkdir()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "ray-cluster.json").write_text(json.dumps({"address": "127.0.0.1:1", "token_file": "/nonexistent"}))
    os.chown(theirs / "ray-cluster.json", 65534, 65534)  # another user's sweep (nobody)
    no_token = tmp_path / "no-token"
    no_token.mkdir()
    (no_token / "ray-cluster.json").write_text(json.dumps({"address": "127.0.0.1:1", "token_file": str(tmp_path / "t")}))
    ended = tmp_path / "ended"
    ended.mkdir()
    (ended / "ray-cluster.json").write_text(json.dumps({"address": "127.0.0.1:1", "state": "ended"}))
    for out, code, expected in ((tmp_path / "missing", 2, "does not exist on"),
                                (not_sweep, 2, "holds no sweep running on a Ray cluster"),
                                (theirs, 2, "belongs to user nobody"),
                                (no_token, 2, "token file"),
                                (ended, 0, "has ended: nothing to join")):
        before = sorted(p.name for p in out.iterdir()) if out.exists() else None
        proc = subprocess.run([PY, "-m", "hpc.join", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == code, (out, proc.stdout, proc.stderr)
        said = (proc.stderr if code else proc.stdout).strip().splitlines()
        assert len(said) == 1 and expected in said[0] and "Traceback" not in proc.stderr, (out, said)
        assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before  # nothing changed


def trial_rows(out: Path) -> list[dict]:
    try:
        with open(out / "trials.csv") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def trials_on(out: Path, node: str) -> dict[str, dict]:
    """The trials whose latest attempt trains on `node` (their workers/rank0.json) and have not finished."""
    found = {}
    for rank0 in sorted((out / "trials").glob("*/workers/rank0.json")):
        try:
            info = json.loads(rank0.read_text())
        except ValueError:
            continue
        if info.get("slurm_node") == node and not (rank0.parent.parent / "summary.json").exists():
            found[rank0.parent.parent.name] = info
    return found


def running_on(out: Path, node: str) -> str | None:
    """A trial that trains on `node` now and has not finished."""
    return next(iter(trials_on(out, node)), None)


def listeners(pids: list[int]) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket in LISTEN state that one of `pids` holds (/proc/net/tcp, IPv4)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # gone meanwhile
            pass
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:
            addr, port = fields[1].split(":")
            found.add((".".join(str(b) for b in reversed(bytes.fromhex(addr))), int(port, 16)))
    return found


def ray_processes_of(tmp: str) -> list[int]:
    """PIDs of the processes whose command line names `tmp` (a Ray node's temp dir: its raylet and agents)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and tmp.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


def test_a_sweep_grows_onto_a_node_freed_later_and_loses_nodes_with_and_without_notice(slurm, tmp_path):
    """The head job takes node1 while another job holds node2; a join job queued for node2 starts once node2 is
    freed (a job of two nodes: a Ray worker on node2 and another on node1), and trials run there. That join job is
    then told to leave (its notice signal): both nodes drain, and the trial on node2 saves at its next step and
    continues from exactly there. A second join job's Ray processes are SIGKILLed: its trial continues from its
    last checkpoint. The sweep completes, and trials.csv and the Optuna study agree."""
    out = tmp_path / "tune"
    log = tmp_path / "head.out"
    sweep = tmp_path / "elastic.toml"
    text = (REPO / "sweeps" / "ci_cluster.toml").read_text()
    # Four trials of 800 steps (20-80 s each here), checkpointed every 100: trials keep landing on node2. The drain
    # takes the trials on node2 and on node1's second worker, and the head's one slot can run only one of them, so a
    # drained trial is waiting for the second node2 job when it joins. Every trial after the loss trains alone on
    # node1: a fifth, once kept as a spare, never ran anywhere else and cost ~60 s alone at the end.
    sweep.write_text(text.replace("steps = 60", "steps = 800")
                     .replace("grace_period = 59", "grace_period = 799")
                     .replace("eval_every = 20", "eval_every = 100").replace("log_every = 20", "log_every = 10"))
    blocker = sbatch(slurm, "--nodelist=node2", "--cpus-per-task=2", f"--output={tmp_path}/blocker.out",
                     "--wrap", "sleep 600")
    slurm.wait_state(blocker, {"RUNNING"}, 60)
    head = sbatch(slurm, "--nodelist=node1", "--cpus-per-task=1", "--gpus-per-node=0", f"--output={log}",
                  "slurm/tune_densenet.sh", "--workers-per-trial", "1",
                  env={"SWEEP": str(sweep), "SYNTHETIC": "1", "OUT": str(out), "GPUS_PER_TRIAL": "0",
                       # Ray's GCS finds a SIGKILLed raylet dead after 5 missed health checks 3 s apart; the
                       # killed trial may have only ~100 steps left (a few seconds), and the sweep can end before
                       # that (seen in CI). 3 checks 1 s apart here: "node node2 left" is then said while it runs.
                       "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    running_cluster(slurm, head)
    wait_for(lambda: (out / "ray-cluster.json").exists(), 120, "the sweep's published cluster")
    # A join job of two nodes (node1 has a CPU left beside the head job): queued until node2 is free, then a Ray
    # worker on each node.
    first = sbatch(slurm, "-N", "2", "--cpus-per-task=1", "--gpus-per-node=0", f"--output={tmp_path}/join1.out",
                   "slurm/join.sh", str(out))
    time.sleep(3)
    assert slurm.job_state(first) == "PENDING"  # node2 is busy
    wait_for(lambda: running_on(out, "node1"), 180, "a trial on node1")
    slurm.run(["scancel", blocker])

    # Node2 joins (and node1's second worker); the sweep now runs three trials at once, one on node2.
    on2 = wait_for(lambda: running_on(out, "node2"), 180, "a trial on node2\n" + job_logs(slurm, head))
    assert all(f"job {first}: {n} (" in (tmp_path / "join1.out").read_text() for n in ("node1", "node2"))
    assert "node node2 joined" in log.read_text()
    time.sleep(2)
    slurm.run(["scancel", "--batch", "--signal=USR1", first])  # leaving with notice: both nodes drain
    assert slurm.wait_state(first, {"COMPLETED", "FAILED", "CANCELLED"}, 120) == "COMPLETED", \
        (tmp_path / "join1.out").read_text()[-3000:]
    said = (tmp_path / "join1.out").read_text()
    assert re.search(r"node2 drained in [\d.]+ s: 1 of 1 workload\(s\) saved their state", said), said[-3000:]
    assert "node1 drained in" in said, said[-3000:]

    # A second node2 worker; its Ray processes are SIGKILLed mid-trial (leaving without notice).
    join = ["--nodelist=node2", "--cpus-per-task=1", "--gpus-per-node=0"]
    second = sbatch(slurm, *join, f"--output={tmp_path}/join2.out", "slurm/join.sh", str(out))
    slurm.wait_state(second, {"RUNNING"}, 120)

    def fresh_on_node2():
        # Any trial placed there since: another one, or the drained trial itself continuing there (attempt 1; its
        # attempt-0 record names the first node2 until then).
        return next((t for t, info in trials_on(out, "node2").items() if t != on2 or info.get("attempt", 0) >= 1),
                    None)
    killed = wait_for(fresh_on_node2, 300, "another trial on node2\n" + job_logs(slurm, head))
    attempt = str(trials_on(out, "node2")[killed].get("attempt", 0))

    def past_a_checkpoint_on_node2():
        # Checkpoints fall on multiples of 100 steps; the trial may have come with steps of an earlier attempt
        # (the drained one, restored here), so the checkpoint must be one this attempt made.
        try:
            with open(out / "trials" / killed / "metrics.csv") as f:
                steps = [int(r["step"]) for r in csv.DictReader(f) if r["attempt"] == attempt]
        except OSError:
            return False
        return bool(steps) and max(steps) >= (steps[0] // 100 + 1) * 100 + 50
    wait_for(past_a_checkpoint_on_node2, 180, "the trial on node2 past a checkpoint of its own there")
    for pid in ray_processes_of(f"/tmp/ray-{second}-"):  # the second join job's only node: node2
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    state = slurm.wait_state(head, {"COMPLETED", "FAILED", "CANCELLED"}, 600)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    # The second join job ends once its node's Ray is gone (not counted as a failed job).
    assert slurm.wait_state(second, {"COMPLETED", "FAILED", "CANCELLED"}, 120) == "COMPLETED", \
        (tmp_path / "join2.out").read_text()[-3000:]

    # The drained trial saved at the step it was at and continued from exactly there: no step trained twice.
    saved = re.search(rf"trial {on2} saved at step (\d+) on draining node node2", text)
    assert saved, text[-4000:]
    step = int(saved.group(1))
    assert re.search(rf"trial {on2}: node node2 drained; it continues from step {step} ", text), text[-4000:]
    rows = list(csv.DictReader(open(out / "trials" / on2 / "metrics.csv")))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and step in steps  # none repeats ...
    assert all(0 < b - a <= 10 for a, b in zip(steps, steps[1:])) and steps[-1] == 800, steps  # ... none is missing
    assert [r["attempt"] for r in rows if int(r["step"]) <= step][-1] == "0"
    after = [r["attempt"] for r in rows if int(r["step"]) > step]
    assert after[0] == "1" and "0" not in after  # the next attempt began right after (a later one, if it was the
    # trial on the second node2, after that node's loss)
    # The lost node's trial continued from its last checkpoint (a multiple of 100 steps).
    lost = re.search(rf"trial {killed}: node node2 lost; it continues from step (\d+) ", text)
    assert lost and int(lost.group(1)) % 100 == 0 and int(lost.group(1)) >= 100, text[-4000:]
    assert "Traceback" not in text and "ActorUnavailableError" not in text, text[-4000:]
    assert "Raylet is terminated" not in text and "[state-dump]" not in text  # Ray's 40 lines a node gone
    assert text.count("node node2 left") >= 2

    # Every trial ended well, once; trials.csv and the study agree trial by trial.
    import optuna

    rows = trial_rows(out)
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"complete", "early-stopped", "infeasible"}, rows
    study = optuna.load_study(study_name="elastic", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))))
    by_trial = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert set(by_trial) == {r["trial_id"] for r in rows}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in by_trial.values())
    # ... and they trained in Tune's own (reused) actors, --workers-per-trial 1's runner.
    summaries = [json.loads(p.read_text()) for p in (out / "trials").glob("*/summary.json")]
    assert {(s["workers"], s["runner"]) for s in summaries} == {(1, "tune")}, summaries
    assert json.loads((out / "ray-cluster.json").read_text())["state"] == "ended"

    # A join that starts after its sweep ended says so and exits 0 (the rest of an array does not fail).
    late = sbatch(slurm, *join, f"--output={tmp_path}/late.out", "slurm/join.sh", str(out))
    assert slurm.wait_state(late, {"COMPLETED", "FAILED", "CANCELLED"}, 120) == "COMPLETED"
    assert "has ended: nothing to join" in (tmp_path / "late.out").read_text()
