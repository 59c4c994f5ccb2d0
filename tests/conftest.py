from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

# On xdist's processes, each computes on its share of the cores, as would any job on a shared node: torch's threads,
# and those of every CLI and Ray worker a test starts, follow OMP_NUM_THREADS (cifarray.train.engine.worker_threads),
# set before anything imports torch. Two processes of two threads each on 2 cores slowed the compute-bound tests
# down 4x instead of 2x (a 300-step run: 38 s alone, 97 s beside a busy process, 51 s there with one thread).
_processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _processes > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _processes))

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import py2_cpickle  # noqa: E402

from cifarray.data.synth import write_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m ...` as a user would, from the repository root."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_cli_here(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` run inside this process, for commands that must end before Ray starts.

    The CLI's own `main` goes through its own `run_cli` (the one-line `error:` and the exit status), with
    stdout and stderr captured, as `run_module` does in a new interpreter, without that interpreter's ~5 s
    of imports on 2 cores (the suite has dozens of such refusals). A bug still raises with its traceback;
    a command that started Ray fails the test. `env` replaces os.environ for the call. Every CLI keeps at
    least one test through `run_module`, so the real `python -m` entry points stay covered."""
    import contextlib
    import importlib
    import importlib.util
    import io
    import signal

    spec = importlib.util.find_spec(module)
    mod = importlib.import_module(f"{module}.__main__" if spec.submodule_search_locations else module)
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_term = dict(os.environ), os.getcwd(), signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                mod.run_cli(mod.main, list(args))
            except SystemExit as exc:  # run_cli always ends in sys.exit
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        signal.signal(signal.SIGTERM, saved_term)
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
            raise AssertionError(f"python -m {module} {' '.join(args)} started Ray")
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory) -> Path:
    """The suite's own cache of procedural sets (runs reuse them within the suite; the user's cache is left alone).

    Set in os.environ, so that the CLIs the tests start inherit it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for the run's workers: each set is made once
        path = tmp_path_factory.getbasetemp().parent / "cifarray-cache"  # (synthetic_for_run renames it in)
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("cifarray-cache")
    os.environ["CIFARRAY_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Small procedural data set written by `cifarray.data synth` (30 train / 10 test per class)."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, train_per_class=30, test_per_class=10, seed=1)
    return out


def write_py2_folder(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0, **overrides) -> Path:
    """A cifar-100-python/ folder in Python 2 cPickle layout, written without cifarray's writer.

    `overrides` replace a file's bytes: train=..., test=..., meta=... .
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        raw = py2_cpickle.split_file(data, fine.tolist(), (fine // 5).tolist(), f"{name} batch 1 of 1")
        (folder / name).write_bytes(overrides.get(name, raw))
    meta = py2_cpickle.meta_file([f"class_{i}" for i in range(100)], [f"super_{i}" for i in range(20)])
    (folder / "meta").write_bytes(overrides.get("meta", meta))
    return folder


def write_py2_copy(root: Path, data) -> Path:
    """`data` (a loaded Cifar100) rewritten in the Python 2 cPickle layout: a folder in the format that is
    not the official release (its md5 sums differ), written without cifarray's writer."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", data.train), ("test", data.test)):
        raw = py2_cpickle.split_file(split.images.reshape(len(split), -1), split.fine_labels.tolist(),
                                     split.coarse_labels.tolist(), f"{name} batch 1 of 1")
        (folder / name).write_bytes(raw)
    (folder / "meta").write_bytes(py2_cpickle.meta_file(data.fine_names, data.coarse_names))
    return folder


def snapshot_status(out: Path, trial_id: str) -> str | None:
    """A trial's status in Tune's newest experiment snapshot (OUT/tune/experiment_state-*.json)."""
    for state in sorted((out / "tune").glob("experiment_state-*.json"), reverse=True):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue  # being replaced
        for data in trials:
            info = json.loads(data[0])
            if info.get("trial_id") == trial_id:
                return info.get("status")
    return None


# `make test` runs the suite on two processes (pytest-xdist). Whole files go to one process where their tests share
# an expensive module fixture: the real Slurm cluster, on fixed ports (tests/slurmctl.py), and the trained models
# of the learning and FID tests; every other test goes wherever a process is free. (`--dist loadgroup` with
# xdist_group marks would say the same, but on pytest 9.2 it silently stops grouping: pytest-xdist#1386.)
WHOLE_FILES = ("tests/test_hpc.py", "tests/test_synth_learnable.py", "tests/test_fid.py")
# Tests that read the same expensive module fixture go to one process together, which makes the fixture once: the
# fixture's name, and the tests that use it. (The two below, apart, made the same 300-step run twice, or one of them
# waited idle for the other's.)
TOGETHER = {"uninterrupted": (
    "tests/test_train.py::test_the_default_runner_learns_as_well_as_a_plain_loop",
    "tests/test_train.py::test_a_run_outlives_a_second_train_a_killed_worker_and_ctrl_c_and_ends_as_if_uninterrupted",
)}


def pytest_collection_modifyitems(config, items):
    """On xdist's processes: the slow tests first, so that the last minutes are not one long test beside an idle
    process (xdist hands out the whole files above first: its largest units). A test that uses a fixture of TOGETHER
    without being listed there is refused: it would pay for the fixture again in another process."""
    for item in items:
        for fixture, nodeids in TOGETHER.items():
            if fixture in getattr(item, "fixturenames", ()) and item.nodeid not in nodeids:
                raise pytest.UsageError(f"{item.nodeid} uses the fixture {fixture!r}: list it in conftest.TOGETHER")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise as collected


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # the suite also runs on one process without xdist
    pass
else:
    class WholeFilesScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path in WHOLE_FILES:
                return path
            return next((fixture for fixture, nodeids in TOGETHER.items() if nodeid in nodeids), nodeid)

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "load":  # what `-n N` uses unless told otherwise
            return WholeFilesScheduling(config, log)
        return None
