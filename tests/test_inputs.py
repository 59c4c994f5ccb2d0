"""Inputs and run folders: every boolean flag both ways, data-size errors before Ray, one live run per folder."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifarray.bench.__main__ import parser as bench_parser
from cifarray.config import Switch, fields_of
from cifarray.data.__main__ import parser as data_parser
from cifarray.data.cifar import load_cifar100
from cifarray.errors import UserError
from cifarray.eval.__main__ import parser as eval_parser
from cifarray.report import parser as report_parser
from cifarray.runlock import LOCK_NAME, FolderLocked, RunLock
from cifarray.registry import FAMILIES
from cifarray.train.__main__ import parse
from cifarray.train.__main__ import parser as train_parser
from cifarray.tune.__main__ import parser as tune_parser
from conftest import REPO, assert_one_line_error, run_cli_here, write_py2_copy
from hpc.ray_cluster import parser as ray_cluster_parser
from hpc.status import parser as status_parser
from hpc.submit import parser as submit_parser

CLIS = {"cifarray.train": train_parser, "cifarray.tune": tune_parser, "cifarray.data": data_parser,
        "cifarray.eval": eval_parser, "cifarray.bench": bench_parser, "cifarray.report": report_parser,
        "hpc.submit": submit_parser, "hpc.status": status_parser, "hpc.ray_cluster": ray_cluster_parser}
TINY = ["--synthetic-train-per-class", "60", "--synthetic-test-per-class", "20", "--growth-rate", "4",
        "--blocks", "2,2,2", "--init-channels", "16", "--augment", "basic"]


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (sub)command of a CLI: (the words that select it, its parser)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def required_args(parser: argparse.ArgumentParser) -> list[str]:
    args = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            continue
        if a.option_strings and a.required:
            args += [a.option_strings[0], "1"]
        elif not a.option_strings and a.nargs in (None, "+", 1):
            args.append("1")
    return args


def meaning(flag: str, dest: str) -> bool:
    """What a flag must set its destination to, by its name: --x/x -> True, --no-x/x -> False, --x/no_x -> False."""
    name = flag[2:].replace("-", "_")
    if name == dest:
        return True
    if name == f"no_{dest}" or f"no_{name}" == dest:
        return False
    raise AssertionError(f"flag {flag} (sets {dest}) says neither yes nor no to its setting")


def test_every_boolean_flag_of_every_cli_sets_what_its_name_says():
    checked = 0
    for cli, make in CLIS.items():
        for path, sub in walk(make()):
            for action in sub._actions:
                if action.nargs != 0 or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                    continue
                for flag in action.option_strings:
                    argv = [*path, flag, *required_args(sub)]
                    got = vars(make().parse_args(argv))[action.dest]
                    assert got is meaning(flag, action.dest), (cli, argv, got)
                    checked += 1
                # Not given: the flag's setting keeps its default (store_true: False; config switches: unset).
                unset = vars(make().parse_args([*path, *required_args(sub)]))[action.dest]
                assert unset in (False, None), (cli, path, action.dest, unset)
    assert checked >= 20  # every CLI's switches, including --no-verify, --force-unlock, --gpu/--no-gpu


@pytest.mark.parametrize("job", sorted(FAMILIES))
def test_train_switches_resolve_both_ways_over_a_config_file(tmp_path, job):
    """--x / --no-x for every boolean config field, also against the opposite value from --config."""
    toml = tmp_path / "c.toml"
    fields = [name for name, (_, tp) in fields_of(FAMILIES[job].config).items() if tp is bool]
    assert {"no_verify", "gpu", "synthetic", "compile"} <= set(fields)
    actions = {a.dest: a for a in dict(walk(train_parser()))[(job,)]._actions}
    for name in fields:
        assert isinstance(actions[name], Switch)
        on, off = actions[name].option_strings
        for value in (True, False):
            toml.write_text(f"{name} = {'false' if value else 'true'}\n")  # the file says the opposite
            source = ["--data-dir", str(tmp_path)]
            if name == "synthetic" and value:
                source = []
            cfg = parse([job, "--config", str(toml), *source, on if value else off]).cfg
            assert getattr(cfg, name) is value, (name, value)
    # The exact line of the issue: --no-verify means "do not verify"; --verify turns it back on.
    assert parse([job, "--data-dir", "d", "--no-verify"]).cfg.no_verify is True
    assert parse([job, "--data-dir", "d", "--no-verify", "--verify"]).cfg.no_verify is False


@pytest.mark.parametrize("job", sorted(FAMILIES))
def test_train_help_names_each_default_once(job):
    text = dict(walk(train_parser()))[(job,)].format_help()
    assert " ".join(text.split()).count("default:") == len(fields_of(FAMILIES[job].config)), text  # each option: once
    assert "(default: None) (default" not in text and "[--no-verify | --verify]" in " ".join(text.split())


def _no_ray_env(tmp_path: Path) -> tuple[dict, Path]:
    ray_tmp = tmp_path / "ray-tmp"
    return {**os.environ, "RAY_TMPDIR": str(ray_tmp)}, ray_tmp


def _cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def py2_folder(tmp_path_factory) -> Path:
    """Procedural images rewritten as a Python-2 CIFAR folder: the format, not the official release."""
    from cifarray.data.synth import write_synthetic

    src = tmp_path_factory.mktemp("synth-src")
    write_synthetic(src, train_per_class=60, test_per_class=20, seed=3)
    root = tmp_path_factory.mktemp("py2")
    write_py2_copy(root, load_cifar100(src, verify=False))
    return root


@pytest.mark.parametrize("job, args, expected", [
    ("densenet", ["--val-size", "6000"], ["--val-size 6000 leaves no training images", "6,000 training images"]),
    ("densenet", ["--val-size", "1000", "--batch-size", "8192"],
     ["--batch-size 8192 is larger than the training images", "5,000 left", "lower --batch-size or --val-size"]),
    ("densenet", ["--val-size", "1000", "--batch-size", "6000", "--workers", "2"],
     ["--batch-size 6000", "2,500 per worker for 2 workers"]),
    ("dcgan", ["--val-size", "6000"], ["--val-size 6000 leaves no training images"]),
    ("dcgan", ["--val-size", "5000", "--batch-size", "1024"], ["--batch-size 1024 is larger than the training"]),
])
def test_data_size_errors_come_before_ray_in_one_line(tmp_path, py2_folder, job, args, expected):
    env, ray_tmp = _no_ray_env(tmp_path)
    out = tmp_path / "out"
    t = time.perf_counter()
    result = run_cli_here("cifarray.train", job, "--data-dir", str(py2_folder), "--no-verify", "--out", str(out),
                          *TINY[4:] if job == "densenet" else [], *args, env=env)
    assert_one_line_error(result, *expected)
    assert time.perf_counter() - t < 45  # Ray's start alone takes ~10 s here; it never began
    assert not ray_tmp.exists() and not out.exists()


def test_default_val_size_on_a_small_procedural_set_is_refused_before_ray(tmp_path):
    env, ray_tmp = _no_ray_env(tmp_path)
    out = tmp_path / "out"
    result = run_cli_here("cifarray.train", "densenet", "--synthetic", "--synthetic-train-per-class", "50",
                          "--out", str(out), env=env)
    assert_one_line_error(result, "--val-size 5000 leaves no training images", "procedural data set has 5,000")
    assert not ray_tmp.exists() and not out.exists()


@pytest.mark.parametrize("space, expected", [
    ('batch_size = { choice = [32, 4096] }', "the sweep's largest batch_size 4096 is larger than the training"),
    ('val_size = { int = [500, 3000] }', "the sweep's largest val_size 3000 leaves no training images"),
    ('batch_size = { int = [32, 2600] }\nval_size = { choice = [300, 500] }',
     "the sweep's largest batch_size 2600 is larger than the training images (2,500 left"),
])
def test_sweeps_whose_trials_cannot_fit_the_data_are_refused_before_the_first_trial(tmp_path, space, expected):
    sweep = tmp_path / "s.toml"
    sweep.write_text('model = "densenet"\ntrials = 2\n[train]\nsteps = 40\neval_every = 20\nval_size = 500\n'
                     'synthetic_train_per_class = 30\nsynthetic_test_per_class = 5\n[space]\n'
                     'lr = { loguniform = [0.01, 0.1] }\n' + space + "\n")
    env, ray_tmp = _no_ray_env(tmp_path)
    out = tmp_path / "out"
    result = run_cli_here("cifarray.tune", "--sweep", str(sweep), "--synthetic", "--out", str(out), env=env)
    assert_one_line_error(result, expected)
    assert not ray_tmp.exists() and not out.exists()


@pytest.mark.parametrize("gpu, workers, cpus, nodes, expected", [
    (True, 8, 4, [{"CPU": 16, "GPU": 4}] * 2, None),  # two 4-GPU nodes hold 8 one-GPU workers
    (True, 9, 4, [{"CPU": 16, "GPU": 4}] * 2, "room for 8); lower --workers to 8 or less, or run on more nodes"),
    (True, 2, 8, [{"CPU": 8, "GPU": 2}, {"CPU": 8}], "room for 1)"),  # 8 CPUs and a GPU fit once per node
    (True, 1, 2, [{"CPU": 2}], "(1 node(s) with 2 CPU(s) and no GPU in all; room for 0); drop --gpu"),
    (False, 3, 1, [{"CPU": 2}], "3 worker(s) with 1 CPU(s) each do not fit"),
    (False, 2, 3, [{"CPU": 4}, {"CPU": 4}], None),
    (False, 1, 3, [{"CPU": 2}, {"CPU": 2}], "room for 0); lower --cpus-per-worker"),  # a worker is on one node
])
def test_workers_that_the_ray_cluster_can_never_hold_are_refused(gpu, workers, cpus, nodes, expected):
    from cifarray.train.config import DenseNetTrainConfig
    from cifarray.train.cluster import check_cluster_fits

    cfg = DenseNetTrainConfig(synthetic=True, gpu=gpu, workers=workers, batch_size=36 * workers)
    if expected is None:
        check_cluster_fits(cfg, cpus, nodes)
    else:
        with pytest.raises(UserError) as exc:
            check_cluster_fits(cfg, cpus, nodes)
        assert expected in str(exc.value)


def test_a_ray_address_that_does_not_answer_is_refused_before_anything_is_written(tmp_path):
    """ray.init waited over 2 minutes on a closed port (Ray's warnings only); `--address auto` with no Ray
    running ended in a traceback."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    sweep = run_cli_here("cifarray.tune", "--sweep", str(REPO / "sweeps" / "quickstart.toml"), "--synthetic",
                         "--out", str(out), "--address", f"127.0.0.1:{port}")
    assert_one_line_error(sweep, f"cannot reach the Ray cluster at 127.0.0.1:{port}", "unset RAY_ADDRESS")
    train = run_cli_here("cifarray.train", "densenet", "--synthetic", "--out", str(out), *TINY, "--val-size", "1000",
                         env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert_one_line_error(train, f"cannot reach the Ray cluster at 127.0.0.1:{port}")
    garbled = run_cli_here("cifarray.train", "densenet", "--synthetic", "--out", str(out), *TINY, "--val-size",
                           "1000", env={**os.environ, "RAY_ADDRESS": "headnode:gcs"})
    assert_one_line_error(garbled, "Ray address 'headnode:gcs'", "is not HOST:PORT")
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--runner", "local", "--workers", "2"],
     ["--runner local trains one worker in this process, not --workers 2", "drop --runner local", "--workers 1"]),
    (["--runner", "local", "--workers", "auto"], ["--workers auto sizes a run to a Ray cluster", "drop --runner local"]),
    (["--runner", "local", "--address", "127.0.0.1:6379"], ["cannot join --address 127.0.0.1:6379", "drop --address"]),
    (["--runner", "nowhere"], ["invalid choice: 'nowhere'"]),
])
def test_a_runner_that_cannot_run_the_job_is_refused_before_anything_is_written(tmp_path, args, expected):
    out = tmp_path / "out"
    result = run_cli_here("cifarray.train", "densenet", "--synthetic", "--out", str(out), *TINY, "--val-size", "1000",
                          *args)
    if args[1] == "nowhere":  # argparse's own refusal (exit 2, usage line first)
        assert result.returncode == 2 and expected[0] in result.stderr and "Traceback" not in result.stderr
    else:
        assert_one_line_error(result, *expected)
    assert not out.exists()


def test_auto_picks_the_local_runner_for_one_worker_and_no_ray_cluster(monkeypatch):
    from cifarray.train.launch import pick_runner

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert pick_runner("auto", 1, False, None) == "local"
    assert pick_runner("auto", 2, False, None) == "ray"  # DDP
    assert pick_runner("auto", None, True, None) == "ray"  # --workers auto: sized to a Ray cluster
    assert pick_runner("auto", 1, False, "10.0.0.1:6379") == "ray"
    assert pick_runner("ray", 1, False, None) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a job script's cluster
    assert pick_runner("auto", 1, False, None) == "ray"
    assert pick_runner("local", 1, False, None) == "local"  # asked for by name: the environment does not refuse it


def test_workers_that_fit_count_per_node_with_gpu_shares():
    from cifarray.train.cluster import workers_that_fit

    nodes = [{"CPU": 8, "GPU": 2}, {"CPU": 2, "GPU": 1}]
    assert workers_that_fit(nodes, 1, 0.25) == 8 + 2  # a quarter GPU each; the small node runs out of CPUs
    assert workers_that_fit(nodes, 2, 0) == 4 + 1
    assert workers_that_fit([{"CPU": 2}, {"CPU": 2}], 4, 0) == 0  # 4 CPUs in all, but on no single node
    assert workers_that_fit([{"CPU": 3}], 1, 1) == 0


def test_a_run_that_would_wait_for_ever_on_ray_is_refused_and_its_folder_left_for_a_rerun(tmp_path):
    """Ray Train waits silently for resources the cluster lacks: before this check `--workers 4` on 2 CPUs hung."""
    env = dict(os.environ)  # Ray's own temporary folder: a pytest path is too long for its sockets
    out = tmp_path / "out"
    workers = 2 * (os.cpu_count() or 1)  # the local Ray has os.cpu_count() CPUs
    result = _cli(env, "cifarray.train", "densenet", "--synthetic", "--out", str(out), *TINY, "--val-size", "1000",
                  "--workers", str(workers), "--batch-size", str(8 * workers), "--steps", "2")
    assert_one_line_error(result, f"{workers} worker(s) with 1 CPU(s) each do not fit this Ray cluster",
                          "lower --workers")
    assert not (out / "config.json").exists()  # so the same --out takes the corrected command


@pytest.mark.parametrize("cli, expected", [
    (["cifarray.train", "densenet", "--synthetic", "--gpu", "--workers", "2"],
     ["--gpu with 2 worker(s) needs 2 GPU(s) but this machine has no GPU", "drop --gpu, or lower --workers"]),
    (["cifarray.train", "dcgan", "--synthetic", "--gpu", "--workers", "auto"],
     ["--gpu with --workers auto needs a GPU but this machine has no GPU", "drop --gpu"]),
    (["cifarray.tune", "--sweep", str(REPO / "sweeps" / "quickstart.toml"), "--synthetic", "--gpus-per-trial", "0.25"],
     ["--gpus-per-trial 0.25 but this machine has no GPU", "pass --gpus-per-trial 0 (or auto)"]),
])
def test_gpu_work_without_a_gpu_or_a_ray_cluster_is_refused_before_ray(tmp_path, cli, expected):
    """Both waited for Ray's start (~10 s) to be refused; the tuner had written its data and settings by then."""
    if __import__("torch").cuda.device_count():
        pytest.skip("this machine has a GPU")
    env, ray_tmp = _no_ray_env(tmp_path)
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    result = run_cli_here(*cli, "--out", str(out), env=env)
    assert_one_line_error(result, *expected)
    assert not ray_tmp.exists() and not out.exists()


def test_workers_auto_sizes_to_the_cluster_and_refuses_gpu_on_a_cluster_without_one(monkeypatch):
    """--workers auto used to drop --gpu without a word on a cluster without GPUs and train on its CPUs."""
    import ray

    from cifarray.train import cluster
    from cifarray.train.config import DenseNetTrainConfig

    monkeypatch.setattr(cluster, "init_ray", lambda: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    cfg = DenseNetTrainConfig(synthetic=True)
    assert (cluster.scale_to_cluster(cfg).workers, cluster.scale_to_cluster(cfg).gpu) == (2, False)  # one per node
    with pytest.raises(UserError, match="--gpu with --workers auto, but the Ray cluster has no GPU; drop --gpu"):
        cluster.scale_to_cluster(DenseNetTrainConfig(synthetic=True, gpu=True))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 3.0})
    for gpu in (False, True):  # GPUs in the cluster: one worker each, on GPU
        scaled = cluster.scale_to_cluster(DenseNetTrainConfig(synthetic=True, gpu=gpu, batch_size=384))
        assert (scaled.workers, scaled.gpu) == (3, True)
    with pytest.raises(UserError, match=r"--workers auto: 3 worker\(s\) \(one per GPU\) do not divide --batch-size "
                       "512; pass --workers 2, or a --batch-size divisible by 3"):
        cluster.scale_to_cluster(DenseNetTrainConfig(synthetic=True))


def test_a_sweep_the_ray_cluster_cannot_hold_leaves_its_folder_as_it_found_it(tmp_path):
    """Refused once Ray has started (the cluster's CPUs are known only then): before, OUT kept the procedural
    data, sweep.toml and tune_args.json of a sweep that never began."""
    out = tmp_path / "out"
    cpus = 2 * (os.cpu_count() or 1)  # the local Ray has os.cpu_count() CPUs
    result = _cli(dict(os.environ), "cifarray.tune", "--sweep", str(REPO / "sweeps" / "quickstart.toml"),
                  "--synthetic", "--out", str(out), "--cpus-per-trial", str(cpus))
    assert_one_line_error(result, f"one trial needs {cpus} CPUs but the Ray cluster has", "lower")
    assert not out.exists()


def test_a_python2_folder_that_is_not_the_official_release_is_refused_without_no_verify(tmp_path, py2_folder):
    # With --no-verify the DDP test trains on such a folder (test_train.py).
    out = tmp_path / "run"
    refused = run_cli_here("cifarray.train", "densenet", "--data-dir", str(py2_folder), "--out", str(out),
                           *TINY[4:], "--val-size", "1000", "--steps", "100")
    assert_one_line_error(refused, "is not the official CIFAR-100 train file", "--no-verify")
    assert not out.exists()


# --- one live run per folder ------------------------------------------------------------------------------

def test_a_second_lock_on_a_held_folder_is_refused_and_a_released_one_is_free(tmp_path):
    folder = tmp_path / "new" / "run"
    with RunLock(folder, "first") as first:
        holder = json.loads(first.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["pid_start"] and holder["started"]
        with pytest.raises(FolderLocked, match=rf"is in use by first \(host .*, pid {os.getpid()}"):
            RunLock(folder, "second").acquire()
    assert not (folder / LOCK_NAME).exists()
    assert not (tmp_path / "new").exists()  # the folders the lock created, empty again, are gone
    with RunLock(folder, "third"):
        (folder / "kept.txt").write_text("x")
    assert (folder / "kept.txt").exists() and not (folder / LOCK_NAME).exists()
    with pytest.raises(UserError, match="exists and is not a folder"):
        RunLock(folder / "kept.txt", "fourth").acquire()


def _stale(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"host": "other-host", "pid": 4242, "pid_start": "1", "started": time.time() - 60,
            "command": "python -m cifarray.train densenet", "slurm_job": None, "slurm_restart": 0}
    (folder / LOCK_NAME).write_text(json.dumps({**base, **holder}))
    return folder / LOCK_NAME


def test_a_lock_whose_holder_is_gone_on_this_host_is_taken_over_with_a_note(tmp_path, capsys):
    import socket

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _stale(tmp_path / "a", host=socket.gethostname(), pid=int(gone.stdout))
    with RunLock(tmp_path / "a", "me"):
        assert json.loads((tmp_path / "a" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "note: taking over" in capsys.readouterr().err
    # A live PID that now belongs to another process (another start time) is a reused PID: gone too.
    _stale(tmp_path / "b", host=socket.gethostname(), pid=os.getppid(), pid_start="12345")
    with RunLock(tmp_path / "b", "me"):
        pass
    assert "its process is gone" in capsys.readouterr().err
    # The same live process: honoured.
    from cifarray.runlock import process_start

    _stale(tmp_path / "c", host=socket.gethostname(), pid=os.getppid(), pid_start=process_start(os.getppid()))
    with pytest.raises(FolderLocked, match="still running on this host"):
        RunLock(tmp_path / "c", "me").acquire()


def test_a_lock_from_another_host_is_honoured_until_stale_forced_or_requeued(tmp_path, monkeypatch, capsys):
    path = _stale(tmp_path / "a")
    with pytest.raises(FolderLocked, match="host other-host, pid 4242.*--force-unlock"):
        RunLock(tmp_path / "a", "me").acquire()
    assert json.loads(path.read_text())["host"] == "other-host"  # untouched
    with RunLock(tmp_path / "a", "me", force=True):
        pass
    assert "--force-unlock" in capsys.readouterr().err
    path = _stale(tmp_path / "b")
    old = time.time() - 2 * 3600
    os.utime(path, (old, old))  # its holder stopped beating two hours ago
    with RunLock(tmp_path / "b", "me", stale_after=3600):
        pass
    assert "no heartbeat for 120 min" in capsys.readouterr().err
    # Slurm: the same job at a lower restart count ran before the requeue, and Slurm has ended it.
    _stale(tmp_path / "c", slurm_job="77", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with RunLock(tmp_path / "c", "me"):
        assert json.loads((tmp_path / "c" / LOCK_NAME).read_text())["slurm_restart"] == 1
    assert "before its requeue" in capsys.readouterr().err
    _stale(tmp_path / "d", slurm_job="77", slurm_restart=1)  # the same incarnation elsewhere: honoured
    with pytest.raises(FolderLocked):
        RunLock(tmp_path / "d", "me").acquire()


def test_the_holder_keeps_its_lock_fresh(tmp_path):
    with RunLock(tmp_path, "me", heartbeat=0.1) as lock:
        old = time.time() - 3600
        os.utime(lock.path, (old, old))
        end = time.monotonic() + 30  # a heartbeat due every 0.1 s; a loaded machine may run it late, not never
        while time.time() - lock.path.stat().st_mtime > 5 and time.monotonic() < end:
            time.sleep(0.05)
        assert time.time() - lock.path.stat().st_mtime < 5


def test_of_runs_started_together_exactly_one_gets_the_lock(tmp_path):
    """Six processes try at once (each waits, ready, for the same go file); the one that gets the lock holds it
    until the other five have been refused, however slowly this machine starts them."""
    code = ("import os, sys, time; from pathlib import Path; from cifarray.runlock import RunLock, FolderLocked\n"
            "sync = Path(sys.argv[2]); (sync / f'ready-{os.getpid()}').touch()\n"
            "while not (sync / 'go').exists(): time.sleep(0.001)\n"
            "try:\n    lock = RunLock(sys.argv[1], 'racer'); lock.acquire()\n"
            "except FolderLocked:\n    sys.exit(3)\n"
            "while not (sync / 'done').exists(): time.sleep(0.01)\n"
            "lock.release()\n")
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), str(sync)], cwd=REPO)
             for _ in range(6)]
    try:
        wait_until(lambda: len(list(sync.glob("ready-*"))) == 6, 120, "six racers ready")
        (sync / "go").touch()
        wait_until(lambda: sum(p.poll() is not None for p in procs) >= 5, 120, "five racers refused")
    finally:
        (sync / "done").touch()
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert codes == [0, 3, 3, 3, 3, 3], codes


def wait_until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout} s: {what}"
        time.sleep(0.01)


LOCAL_RAY = """
import atexit, json, os, stat, urllib.error, urllib.request
import ray
import ray._private.worker
from cifarray.train import cluster

def at_exit():  # runs after cifarray's exit hooks, before Ray's shutdown (registered when Ray was imported)
    procs = ray._private.worker._global_node.all_processes
    print("EXIT", json.dumps({kind: procs[kind][0].process.poll() for kind in ("monitor", "gcs_server")}))

atexit.register(at_exit)
cluster.init_ray()
path = os.environ["RAY_AUTH_TOKEN_PATH"]

def dashboard(token=None):
    req = urllib.request.Request(os.environ["RAY_API_SERVER_ADDRESS"] + "/api/version")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code

print("LOCAL", json.dumps({"cpu": ray.cluster_resources()["CPU"], "mode": os.environ["RAY_AUTH_MODE"], "path": path,
                           "file": oct(stat.S_IMODE(os.stat(path).st_mode)),
                           "folder": oct(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)),
                           "tokenless": dashboard(), "token": dashboard(open(path).read().strip())}))
"""


def test_a_local_ray_counts_only_the_cpus_and_gpus_this_process_may_use_and_has_a_token_of_its_own(monkeypatch,
                                                                                                    tmp_path):
    """Ray counts every CPU of the node; inside `salloc`, a Slurm cpuset or `taskset` it planned trials on CPUs
    the job does not own. Measured for real: a local Ray started under `taskset -c 0` has one CPU. Its token is the
    run's own (0600, in a 0700 folder, gone at exit), not Ray's shared ~/.ray/auth_token."""
    from cifarray.train.cluster import local_resources

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert local_resources() == {"num_cpus": 4}
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert local_resources() == {"num_cpus": 2, "num_gpus": 2}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_resources()["num_gpus"] == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA stops at the first invalid index
    assert local_resources()["num_gpus"] == 1
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CPUS_ON_NODE", "RAY_ADDRESS") and
           not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # where Ray's own token would go: ~/.ray/auth_token
    proc = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", LOCAL_RAY], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    said = [line for line in proc.stdout.splitlines() if line.startswith("LOCAL ")]
    assert proc.returncode == 0 and said, proc.stdout + proc.stderr[-2000:]
    got = json.loads(said[0][len("LOCAL "):])
    assert got["cpu"] == 1.0 and got["mode"] == "token", got
    assert (got["file"], got["folder"], got["tokenless"], got["token"]) == ("0o600", "0o700", 401, 200), got
    assert not (tmp_path / ".ray").exists() and not Path(got["path"]).parent.exists()
    from cifarray.train.cluster import TOKEN_PREFIX, _pid_namespace  # named for its process: see the next test
    assert Path(got["path"]).parent.name.startswith(f"{TOKEN_PREFIX}{_pid_namespace()}."), got
    # Ray's shutdown stops the GCS before the autoscaler monitor, which then waits on the GCS until it is killed 1 s
    # later (docs/BENCHMARKS.md). The run's exit ends the monitor first, and leaves the GCS to Ray's shutdown.
    ended = [json.loads(line[len("EXIT "):]) for line in proc.stdout.splitlines() if line.startswith("EXIT ")]
    assert ended == [{"monitor": -signal.SIGKILL, "gcs_server": None}], proc.stdout


def test_token_folders_of_runs_that_died_unhooked_are_removed_by_the_next_local_ray_and_no_other(tmp_path):
    """A SIGKILLed run cannot remove its token folder at exit; the next local Ray removes those of this user's dead
    processes (named <PID namespace>.<PID>), and nothing that may still be in use."""
    from cifarray.train.cluster import TOKEN_PREFIX, _owner_tag, _pid_namespace, remove_stale_tokens

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ns = _pid_namespace()
    folders = {
        "dead": f"{TOKEN_PREFIX}{_owner_tag(dead.pid)}-ab_c1",
        "live": f"{TOKEN_PREFIX}{_owner_tag()}-x7y8z9",
        "other namespace": f"{TOKEN_PREFIX}{int(ns) + 1}.{dead.pid}-qqqqq",
        "unnamed (before PIDs)": f"{TOKEN_PREFIX}g_zblz05",
    }
    for name in folders.values():
        (tmp_path / name).mkdir(mode=0o700)
        (tmp_path / name / "token").write_text("secret")
    not_a_folder = tmp_path / f"{TOKEN_PREFIX}{_owner_tag(dead.pid)}-file1"
    not_a_folder.write_text("")
    assert remove_stale_tokens(tmp_path) == [folders["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*folders.values(), not_a_folder.name][1:])


EXIT_PROBE = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from cifarray.errors import UserError, run_cli
out = Path(sys.argv[1])

class Teardown:
    def __del__(self):  # runs only when the interpreter frees its modules one by one
        (out / "teardown").write_text("ran")

keep = Teardown()

def main(argv):
    atexit.register(lambda: (out / "hook").write_text("ran"))
    threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("ran"))).start()
    # A pool never shut down (torch's inductor leaves one): its idle worker thread ends only with Python's own
    # thread shutdown.
    pool = ThreadPoolExecutor(1)
    pool.submit(time.sleep, 0.1)
    print("no newline, still in the buffer", end="")
    if sys.argv[2] == "refuse":
        raise UserError("a bad input")
    return 0

if __name__ == "__main__":
    run_cli(main)
"""
RUN_PROBE = """
import runpy, sys
try:
    runpy.run_module("exitprobe", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    print(f" and the caller goes on ({exc.code})", end="")
"""


@pytest.mark.parametrize("how, code", [("succeed", 0), ("refuse", 2), ("profiled", 0), ("run_module", 0)])
def test_a_cli_process_ends_with_its_status_output_threads_and_exit_hooks_and_no_teardown_only_its_own(tmp_path,
                                                                                                      how, code):
    """A process the interpreter started for a CLI (`python -m M`) ends without the interpreter's teardown (1-2 s of
    CPU once torch is loaded), and with everything a clean exit owes: its status, the whole of stdout, the threads
    it waits for and the exit hooks (Ray's shutdown, the token folder). Under cProfile or inside another program
    (runpy, IPython's %run -m) it ends with SystemExit, as before: the profile is written, the caller goes on."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "exitprobe.py").write_text(EXIT_PROBE)
    command = {"profiled": ["-m", "cProfile", "-o", str(tmp_path / "profile"), "-m", "exitprobe"],
               "run_module": ["-c", RUN_PROBE]}.get(how, ["-m", "exitprobe"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "probe"), str(REPO)])}
    result = subprocess.run([sys.executable, *command, str(tmp_path), "refuse" if how == "refuse" else "succeed"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    said = "no newline, still in the buffer" + (" and the caller goes on (0)" if how == "run_module" else "")
    assert result.returncode == code and result.stdout == said, result
    assert (result.stderr.strip() == "error: a bad input") == (how == "refuse"), result.stderr
    assert (tmp_path / "thread").is_file() and (tmp_path / "hook").is_file()
    assert (tmp_path / "teardown").exists() == (how in ("profiled", "run_module"))
    assert (tmp_path / "profile").exists() == (how == "profiled")
