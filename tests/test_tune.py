"""python -m cifarray.tune: sweep validation, budget-infeasible trials, ASHA, resume after SIGKILL, console."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, assert_one_line_error, digest, run_cli_here, run_module, snapshot_status

CI_SWEEP = REPO / "sweeps" / "ci_densenet.toml"
PNG = b"\x89PNG\r\n\x1a\n"


def write_sweep(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BASE = """
model = "densenet"
trials = 4
[train]
steps = 40
eval_every = 20
[space]
"""


@pytest.mark.parametrize("text, expected", [
    (BASE.replace("trials = 4", "trails = 4") + "lr = { loguniform = [0.01, 0.1] }", "unknown key 'trails'"),
    (BASE + "lr = { loguniform = [0.01, 0.1] }\nwidth = { int = [1, 4] }", "[space] unknown key 'width'"),
    (BASE + "lr = { loguniform = [0.1, 0.01] }", "range [0.1, 0.01] is empty or inverted"),
    (BASE + "growth_rate = { int = [4, 4] }", "range [4, 4] is empty or inverted"),
    (BASE + "batch_size = { choice = [] }", "choice must be a non-empty list"),
    (BASE + "lr = { loguniform = [0.0, 0.1] }", "a log range needs lo > 0"),
    (BASE + "growth_rate = { uniform = [2, 8] }", "not a real-valued setting"),
    (BASE.replace("steps = 40", "steps = 40\nout = 'x'") + "lr = { loguniform = [0.01, 0.1] }",
     "[train] key 'out' is set by the tuner"),
    (BASE.replace("steps = 40", "steps = 40\nlearning_rate = 0.1") + "lr = { loguniform = [0.01, 0.1] }",
     "unknown key 'learning_rate'"),
    (BASE + "growth_rate = { int = [30, 40] }\nnum_blocks = { int = [3, 4] }\nlayers_per_block = { int = [6, 9] }",
     "no config in the space fits the budget of 100,000 parameters"),
    (BASE + "num_blocks = { int = [2, 3] }", "num_blocks and layers_per_block go together"),
    (BASE.replace("[space]", "[asha]\ngrace_period = 10\n[space]") + "lr = { loguniform = [0.01, 0.1] }",
     "grace_period 10 is shorter than train.eval_every"),
    ('trial_runner = "fast"\n' + BASE + "lr = { loguniform = [0.01, 0.1] }",
     "trial_runner must be one of auto, tune, train, got 'fast'"),
    (BASE + "lr = { loguniform = [0.01, 0.1] }\n[baseline]\nlr = 0.5", "[baseline]: lr = 0.5 is outside its range "
     "[0.01, 0.1]; change the baseline, or widen [space] lr"),
    (BASE + "lr = { loguniform = [0.01, 0.1] }\n[baseline]\nlr = 0.05\ngrowth_rate = 8",
     "[baseline]: unknown key 'growth_rate'; a baseline gives the [space] keys only (lr)"),
    (BASE + "lr = { loguniform = [0.01, 0.1] }\ngrowth_rate = { int = [4, 8] }\n[baseline]\nlr = 0.05",
     "[baseline]: 'growth_rate' is missing; a baseline is a whole configuration of the space (lr, growth_rate)"),
    (BASE + "lr = { loguniform = [0.01, 0.1] }\n[baseline]\nlr = 'fast'", "[baseline]: lr = 'fast' must be a number"),
    (BASE + "growth_rate = { int = [4, 8] }\n[baseline]\ngrowth_rate = 6.5", "growth_rate = 6.5 must be an integer"),
    (BASE + "bottleneck = { choice = [true, false] }\n[baseline]\nbottleneck = 1",
     "bottleneck = 1 is not one of its choices [True, False]"),
    (BASE + "growth_rate = { int = [4, 30] }\nnum_blocks = { int = [1, 4] }\nlayers_per_block = { int = [1, 9] }\n"
     "[baseline]\ngrowth_rate = 30\nnum_blocks = 4\nlayers_per_block = 9",
     "[baseline]: 2,698,827 parameters, over the budget of 100,000; change the baseline, or raise train.param_budget"),
    ("baseline = 3\n" + BASE + "lr = { loguniform = [0.01, 0.1] }", "[baseline] must be a table"),
    ('confirm = "3"\n' + BASE + "lr = { loguniform = [0.01, 0.1] }", "confirm must be K:S, got '3'"),
    ('confirm = "0:3"\n' + BASE + "lr = { loguniform = [0.01, 0.1] }", "confirm: K = 0 confirms no configuration"),
    ('confirm = 2\n' + BASE + "lr = { loguniform = [0.01, 0.1] }", "confirm must be K:S, got 2"),
    (BASE + "lr = { loguniform = [0.01, 0.1] }\n#--confirm 2:1", "--confirm: S = 1 seed(s) cannot measure seed noise"),
    (BASE + "lr = { loguniform = [0.01, 0.1] }\n#--confirm 2:x", "--confirm must be two whole numbers K:S, got '2:x'"),
    (BASE + "lr = { loguniform = [0.01, 0.1] }\n#--confirm 2:3:4", "--confirm must be K:S, got '2:3:4'"),
    ('trial_runner = "tune"\n' + BASE + "lr = { loguniform = [0.01, 0.1] }\n#workers",
     "--trial-runner tune trains one worker inside each trial's actor, but a trial has 2 workers"),
])
def test_bad_sweep_files_are_refused_in_one_line_before_ray(tmp_path, text, expected):
    sweep = write_sweep(tmp_path / "bad.toml", text)
    out = tmp_path / "out"
    t = time.perf_counter()
    extra = (["--workers-per-trial", "2"] if text.endswith("#workers") else
             text.rsplit("#", 1)[1].split() if "#--" in text else [])
    result = run_cli_here("cifarray.tune", "--sweep", str(sweep), "--synthetic", "--out", str(out), *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing written: the sweep is checked first
    assert time.perf_counter() - t < 60  # no Ray cluster was started (that alone takes ~10 s here)


def test_space_sampler_marks_over_budget_configs_through_optunas_constraint_api():
    import optuna

    from cifarray.tune.sweep import load
    from cifarray.tune.trial import CONSTRAINT, INFEASIBLE, SpaceSampler

    sweep = load(CI_SWEEP)
    sampler = SpaceSampler(sweep)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    seen = {True: 0, False: 0}
    for _ in range(40):
        trial = study.ask()
        out = sampler(trial)
        over = out["params"] > sweep.budget
        assert bool(out[INFEASIBLE]) == over
        study.tell(trial, 0.0 if over else 0.5)
        # TPE's feasibility signal (Optuna's constraint API) matches the budget exactly.
        assert (study.trials[-1].constraints[CONSTRAINT] > 0) == over
        # The count is exact: the model built from the sampled config has exactly that many parameters.
        from cifarray.models.densenet import DenseNet

        cfg = sweep.config_for(sweep.overrides({k: v for k, v in trial.params.items()}))
        assert sum(p.numel() for p in DenseNet(cfg.model_config()).parameters()) == out["params"]
        seen[over] += 1
    assert seen[True] and seen[False]  # the CI space straddles its budget


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def metric_steps(trial_dir: Path) -> int:
    with open(trial_dir / "metrics.csv", newline="") as fh:
        return max(int(r["step"]) for r in csv.DictReader(fh))


def wait_until(predicate, timeout: float):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s")


def http_json(url: str):
    """The JSON a local server answers with, or None while it does not answer yet."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def dashboard_trials(db: Path) -> list[dict]:
    """Every trial of the only study in `db` (a journal file), as optuna-dashboard's HTTP API serves them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "optuna-dashboard"
    dash = subprocess.Popen([str(exe), str(db), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}/api/studies"
        studies = wait_until(lambda: http_json(base) or (dash.poll() is not None and {"ended": dash.returncode}),
                             60)
        assert "study_summaries" in studies, (studies, dash.stderr and dash.stderr.read())
        (study,) = studies["study_summaries"]
        return http_json(f"{base}/{study['study_id']}")["trials"]
    finally:
        dash.terminate()
        dash.wait(10)


def descendants(pid: int) -> set[int]:
    """PIDs started (transitively) by `pid`, read from /proc while it still lives."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def train_alone(run: Path, out: Path) -> None:
    """Train a sweep's run again, uninterrupted, from its config.json, with the local runner in this process: the
    runners train bit-identically (tests/test_train.py; a Tune actor against a TorchTrainer, below), so this is the
    run as it would have been without a kill, at no second sweep's cost (Ray, Tune, its end)."""
    config = json.loads((run / "config.json").read_text())
    flags = out.parent / f"{out.name}.toml"
    flags.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items() if v is not None and k != "out"))
    alone = run_cli_here("cifarray.train", "densenet", "--config", str(flags), "--out", str(out))
    assert alone.returncode == 0, alone.stderr[-3000:]


def freeze_runs_in_training(runs: Path, proc: subprocess.Popen, started: set[int], min_done: int,
                            deadline: float) -> tuple[list[Path], set[Path]]:
    """Once `min_done` runs under `runs` have finished (summary.json) while others train (trial.json, no summary yet),
    freeze the training runs' actors (SIGSTOP): a kill of the driver then lands mid-sweep whatever the machine's
    speed. A run trains for a second or two in its reused actor, so the folders are watched every 0.05 s, and a run
    that finished in the instant before its actor stopped makes the try void: every actor stopped goes on (SIGCONT)
    and the next such moment is awaited. Returns (the finished runs, the frozen ones); adds every Ray process the
    driver started, the frozen actors too, to `started`."""
    polls = 0
    while True:
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it was killed"
        if polls % 20 == 0:
            started |= descendants(proc.pid)
        polls += 1
        folders = list(runs.iterdir()) if runs.is_dir() else []
        done = [d for d in folders if (d / "summary.json").is_file()]
        training = [d for d in folders if d not in done]
        if len(done) >= min_done and training and all((d / "trial.json").is_file() for d in training):
            pids = {json.loads((d / "trial.json").read_text())["pid"] for d in training}  # written whole (renamed)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            started |= pids
            if not any((d / "summary.json").is_file() for d in training):
                started |= descendants(proc.pid)
                return done, set(training)
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)


@pytest.mark.slow
def test_sweep_refuses_a_second_start_survives_sigkill_skips_infeasible_stops_weak_and_tests_only_the_best(tmp_path,
                                                                                                        monkeypatch):
    """One sweep, SIGKILLed once its first trial has completed, then resumed; its one-worker trials train in
    their own reused Tune actors (--trial-runner auto).

    With seed 1 and one trial at a time the trials run: complete, infeasible, early-stopped,
    infeasible (measured). The kill lands while the third trains (in the actor the first one used), so ASHA
    judges it after the resume, against the first trial's rung records that the resumed scheduler replayed
    (cifarray/tune/asha.py; Tune's own ASHA comes back with empty rungs and would let it complete).
    """
    out = tmp_path / "sweep"
    # One trial at a time: ASHA's decisions then depend only on the (seeded) results, not on timing.
    cmd = [sys.executable, "-m", "cifarray.tune", "--sweep", str(CI_SWEEP), "--synthetic", "--out", str(out),
           "--max-concurrent", "1"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: set[int] = set()
    try:
        deadline = time.time() + 300
        while not (out / "tune").exists():
            assert first.poll() is None and time.time() < deadline, "the sweep ended before its experiment began"
            time.sleep(0.5)
        # A second sweep on the same folder, as a fresh start or as a resume (a double sbatch, an early
        # requeue): refused in one line naming the first, which goes on as if alone.
        for again in (cmd, [sys.executable, "-m", "cifarray.tune", "--out", str(out), "--resume=auto"]):
            second = subprocess.run(again, cwd=REPO, capture_output=True, text=True, timeout=120)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
            assert f"{out} is in use by python -m cifarray.tune" in lines[0] and f"pid {first.pid}" in lines[0]
        # Killed while the next trained trial runs, its actor frozen until Tune's experiment snapshot (10 s or more
        # apart) holds the finished trials.
        done, _ = freeze_runs_in_training(out / "trials", first, started, 1, deadline + 300)
        finished = [{"trial_id": d.name} for d in done]
        wait_until(lambda: all(snapshot_status(out, t["trial_id"]) == "TERMINATED" for t in finished), 60)
        before = {t["trial_id"]: digest(out / "trials" / t["trial_id"] / "metrics.csv") for t in finished}
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
        for pid in started:  # Ray processes the killed driver had started (stopped by PID)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # What a sweep stopped early reports (Tune returns from fit so after Ctrl-C): interrupted, the best trial
    # so far, and no test evaluation yet; the resume below rewrites it.
    from cifarray.tune import results
    from cifarray.tune.sweep import load

    sweep = load(out / "sweep.toml")
    goal = sweep.family.sweep.objective(sweep.family.driver_context(sweep.base))
    stopped = results.conclude(out, sweep, goal.metric, goal.mode, goal.label, data_dir=out / "data", synthetic=True,
                             seconds=1.0, requested=4)
    ended = sum(n for s, n in stopped["by_status"].items() if s in results.DONE)
    assert stopped["status"] == "interrupted" and stopped["unfinished_trials"] == 4 - ended > 0, stopped
    assert stopped["best"]["trial_id"] in before and "test_acc" not in stopped["best"]
    # Resumed at two trials at once (as on a bigger allocation): Tune's restored limiter would keep the first
    # run's one (cifarray/tune/searcher.py).
    resumed_at = datetime.datetime.now()  # Optuna's clock: local, naive
    result = run_module("cifarray.tune", "--out", str(out), "--resume", "--max-concurrent", "2", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming {out / 'tune'} at this allocation's 2 trial(s) at once" in result.stdout, result.stdout
    # The killed sweep left its lock behind; its process is provably gone, so the resume took it over.
    assert f"note: taking over {out / 'cifarray.lock'}" in result.stderr and "its process is gone" in result.stderr
    assert not (out / "cifarray.lock").exists()
    trials = rows(out / "trials.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert len(trials) == 4 == summary["trials"]
    for trial_id, h in before.items():
        assert next(t for t in trials if t["trial_id"] == trial_id)["status"] == "complete"
        assert digest(out / "trials" / trial_id / "metrics.csv") == h  # not trained again
    by = {s: [t for t in trials if t["status"] == s] for s in ("complete", "early-stopped", "infeasible")}
    assert len(by["infeasible"]) >= 1 and len(by["early-stopped"]) >= 1 and len(by["complete"]) >= 1, trials
    assert sum(map(len, by.values())) == 4, trials
    for t in by["infeasible"]:
        assert int(t["params"]) > 8000 and t["steps"] == "0" and "budget" in t["infeasible_reason"]
        assert not (out / "trials" / t["trial_id"]).exists()  # no trainer was ever built for it
    for t in by["complete"] + by["early-stopped"]:
        assert int(t["params"]) <= 8000
        assert int(t["steps"]) == metric_steps(out / "trials" / t["trial_id"])
    assert all(int(t["steps"]) == 60 for t in by["complete"])
    assert all(int(t["steps"]) < 60 for t in by["early-stopped"])  # ASHA stopped them at a rung
    assert summary["status"] == "complete" and summary["unfinished_trials"] == 0
    assert summary["infeasible_steps"] == 0 and summary["infeasible_trials"] == len(by["infeasible"])
    assert summary["total_steps"] == sum(int(t["steps"]) for t in trials)
    # Selection on validation; test evaluated once, for the best trial only (trial runs never touch it).
    best = summary["best"]
    assert best["trial_id"] in {t["trial_id"] for t in by["complete"]}
    finals = [json.loads((out / "trials" / t["trial_id"] / "summary.json").read_text())["val_acc"]
              for t in by["complete"]]
    assert best["val_acc"] == pytest.approx(max(finals), abs=1e-6)  # metrics.csv holds 6 significant digits
    assert 0.0 <= best["test_acc"] <= 1.0 and best["params"] <= 8000
    for t in by["complete"]:
        assert json.loads((out / "trials" / t["trial_id"] / "summary.json").read_text())["test_acc"] is None
    # A --resume of the finished sweep concludes it again: with the stored test result, not a second look.
    monkeypatch.setattr(results, "evaluate_best_on_test", lambda *a, **k: pytest.fail("test split evaluated again"))
    again = results.conclude(out, sweep, goal.metric, goal.mode, goal.label, data_dir=out / "data", synthetic=True,
                             seconds=1.0, requested=4)
    assert again["best"] == best
    for name in ("val_vs_params.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert len(list((out / "tune").glob("*/params.json"))) >= 4 and not list((out / "tune").glob("*/checkpoint_*"))
    assert "Traceback" not in result.stderr
    assert "sweep done" in result.stdout and "0 on infeasible configs" in result.stdout
    # The Optuna study (OUT/optuna.journal) holds every trial, the killed run's and the resumed run's, each once, with
    # Tune's trial id, its value and its feasibility.
    import optuna

    from cifarray.tune.searcher import open_storage

    study = optuna.load_study(study_name="ci_densenet", storage=open_storage(out))
    tune_ids = {t["trial_id"] for t in trials}
    # A trial the killed run asked for in the instant before it named the Tune trial has no trial_id.
    stored = {t.user_attrs.get("trial_id"): t for t in study.trials if t.user_attrs.get("trial_id") in tune_ids}
    assert set(stored) == tune_ids and sum(t.user_attrs.get("trial_id") in tune_ids for t in study.trials) == 4
    # What only the killed run knew stays honest: a trial it asked Optuna for after Tune's last snapshot of the
    # experiment is asked again on resume, and the first ask ends failed and marked lost (never left running);
    # one it finished after that snapshot stays complete (it ran) though Tune, restored, no longer lists it.
    for t in study.trials:
        if t.user_attrs.get("trial_id") not in tune_ids:
            assert ("lost" in t.user_attrs and t.state == optuna.trial.TrialState.FAIL) or (
                t.state == optuna.trial.TrialState.COMPLETE and t.datetime_complete < resumed_at), t
    # Two at once after the resume: two trials were out at once (one at a time, as the first run's limit was,
    # Optuna is asked for the next trial only once the last one is told).
    spans = sorted((t.datetime_start, t.datetime_complete) for t in stored.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    for t in trials:
        ot = stored[t["trial_id"]]
        assert ot.state == optuna.trial.TrialState.COMPLETE and ot.user_attrs["params"] == int(t["params"])
        assert (ot.system_attrs["constraints:params_over_budget"] > 0) == (t["status"] == "infeasible")
        if t["status"] != "infeasible":
            assert ot.params["lr"] == pytest.approx(float(t["lr"]), rel=1e-3)
            # Intermediate values at the trial's evaluation steps (eval_every 20), not Tune's report count (Tune
            # tells Optuna the last report as the value, not as an intermediate one).
            assert set(ot.intermediate_values) <= set(range(20, int(t["steps"]), 20))
            assert set(ot.intermediate_values) == {20, 40} or t["status"] != "complete"
    # optuna-dashboard shows the same: every trial with its parameters, value and feasibility (which it reads
    # from the constraints' list form), and the Tune trial it was.
    served = {next(a["value"] for a in d["user_attrs"] if a["key"] == "trial_id"): d
              for d in dashboard_trials(out / "optuna.journal")}
    assert set(served) >= tune_ids and len(served) == len(study.trials)
    for t in trials:
        d = served[t["trial_id"]]
        assert d["values"] == [stored[t["trial_id"]].value] and len(d["constraints"]) == 1
        assert (d["constraints"][0] > 0) == (t["status"] == "infeasible")
        assert {p["name"]: p["param_external_value"] for p in d["params"]}["batch_size"] == t["batch_size"]


def test_a_resumed_sweeps_asha_judges_new_trials_against_the_finished_ones():
    """Tune hands a resumed experiment's scheduler every restored trial but not the rungs it had; the
    finished trials' metrics.csv are replayed into them, so a trial that an uninterrupted sweep would
    stop at a rung is stopped after a resume too (Tune's own ASHA, restored, lets it go on)."""
    import tempfile
    from types import SimpleNamespace as T

    from ray.tune.schedulers import ASHAScheduler

    from cifarray.tune.asha import ResumableASHA

    kw = dict(time_attr="step", metric="val_acc", mode="max", max_t=60, grace_period=20, reduction_factor=3)
    with tempfile.TemporaryDirectory() as out:
        # Two trials finished before the interruption: one ran to the end, one ASHA stopped at step 20.
        # Rows without an evaluation (empty val_acc) were not reports of the objective.
        for trial_id, curve in (("aaaa", {10: "", 20: "0.30", 40: "0.50", 60: "0.60"}), ("bbbb", {20: "0.20"})):
            folder = Path(out) / "trials" / trial_id
            folder.mkdir(parents=True)
            (folder / "metrics.csv").write_text("step,loss,val_acc\n" + "".join(
                f"{step},1.0,{acc}\n" for step, acc in curve.items()))
        decisions = {}
        for scheduler in (ResumableASHA(out=out, **kw), ASHAScheduler(**kw)):
            for trial_id in ("aaaa", "bbbb", "cccc"):  # cccc: infeasible, no folder, no report
                scheduler.on_trial_add(None, T(trial_id=trial_id, status="TERMINATED"))
            scheduler.on_trial_add(None, T(trial_id="new", status="PENDING", get_trainable_cls=lambda: None))
            decisions[type(scheduler).__name__] = scheduler.on_trial_result(
                None, T(trial_id="new", status="RUNNING"), {"step": 20, "val_acc": 0.22})
    # Rung 20 holds 0.30 and 0.20: its cutoff (the 67th percentile, 0.267) stops a trial at 0.22.
    assert decisions == {"ResumableASHA": "STOP", "AsyncHyperBandScheduler": "CONTINUE"}


def test_a_resumed_sweeps_unfinished_trial_asks_for_what_the_new_plan_gives_a_trial():
    """Tune keeps a restored trial's resources; one from an allocation with more CPUs per trial would wait for ever
    on a smaller one. The resumed scheduler gives it what the trainable it was restored with asks for."""
    from ray import tune
    from ray.tune.experiment import Trial
    from ray.tune.registry import register_trainable

    from cifarray.tune.asha import ResumableASHA

    def trainable(config):
        pass

    register_trainable("follow_plan", tune.with_resources(trainable, {"CPU": 4}))  # the first run's plan
    unfinished, running = Trial("follow_plan"), Trial("follow_plan")
    for t in (unfinished, running):
        t.create_placement_group_factory()
    running.set_status(Trial.RUNNING)
    register_trainable("follow_plan", tune.with_resources(trainable, {"CPU": 1}))  # the resumed run's
    for t in (unfinished, running):
        ResumableASHA._follow_plan(t)
    assert unfinished.placement_group_factory.required_resources == {"CPU": 1}
    assert running.placement_group_factory.required_resources == {"CPU": 4}


def test_the_console_writes_trials_csv_at_most_once_a_second_and_drops_an_ended_trials_checkpoints(tmp_path,
                                                                                                monkeypatch):
    """trials.csv holds every trial, so writing it on every result made a long sweep's cost per trial grow with its
    size: it is written at most once per WRITE_EVERY seconds, and always at the end. An ended trial's Tune
    checkpoints go (a resume never continues it) once a stored snapshot says it ended; a running trial's stay."""
    from rich.console import Console

    from cifarray.tune import console as console_mod
    from cifarray.tune.console import SweepConsole
    from cifarray.tune.elastic import Nodes
    from cifarray.tune.sweep import load

    clock = [1000.0]
    monkeypatch.setattr(console_mod.time, "time", lambda: clock[0])
    writes = []
    write_trials = console_mod.write_trials
    monkeypatch.setattr(console_mod, "write_trials", lambda *a, **k: writes.append(clock[0]) or write_trials(*a, **k))
    view = SweepConsole(str(tmp_path), load(CI_SWEEP), "val_acc", "max", "validation accuracy", total=2,
                        console=Console(file=io.StringIO()), live=False)
    folders = []
    for n in (1, 2):
        folders.append(tmp_path / "tune" / f"run_trial_aaaa000{n}_{n}")
        for step in (20, 40):
            (folders[-1] / f"checkpoint_00000{step // 20}").mkdir(parents=True)
    trials = [SimpleNamespace(trial_id=f"aaaa000{n}", status="RUNNING", local_path=str(f), path=str(f),
                              run_metadata=SimpleNamespace(num_failures=0),
                              config={"batch_size": 32, "lr": 0.1, "growth_rate": 4, "num_blocks": 2, "layers_0": 1,
                                      "layers_1": 1, "params": 2000, "infeasible": ""},
                              last_result={"step": 0}, metric_analysis={}) for n, f in zip((1, 2), folders)]
    cluster = [{"NodeID": n, "Alive": True, "Labels": {"slurm-node": n}, "Resources": {"CPU": 1}} for n in "ab"]
    view.nodes = Nodes(read=lambda: (cluster, set()))
    view.nodes.poll(force=True)
    view.on_trial_start(0, trials, trials[0])
    assert writes == [1000.0]
    for step in range(1, 200):  # 199 results within the same second: no write
        trials[0].last_result = {"step": step, "val_acc": step / 1000}
        view.on_trial_result(0, trials, trials[0], trials[0].last_result)
        view.on_step_end(0, trials)
    assert writes == [1000.0]
    clock[0] += console_mod.WRITE_EVERY
    view.on_step_end(0, trials)  # the second has passed: what changed is written, once
    view.on_step_end(0, trials)
    assert writes == [1000.0, 1001.0]
    assert [r["steps"] for r in rows(tmp_path / "trials.csv")] == ["199", "0"]
    trials[0].last_result = {"step": 200, "val_acc": 0.3}
    view.on_trial_complete(0, trials, trials[0])
    trials[0].status = "TERMINATED"
    # An ended trial's Tune checkpoints stay until a snapshot that holds it as ended is stored: Tune asks for the
    # console's state while it writes a snapshot; the trials ended by the one before go then.
    for snapshot in range(2):
        assert len(list(folders[0].glob("checkpoint_*"))) == 2 and len(list(folders[1].glob("checkpoint_*"))) == 2
        view.get_state()
    assert not list(folders[0].glob("checkpoint_*")) and len(list(folders[1].glob("checkpoint_*"))) == 2
    (folders[0] / "checkpoint_000003").mkdir()  # as a killed earlier run of the sweep left it
    cluster.pop()  # node b leaves in the sweep's last second: the end says so, without waiting for a poll
    view.on_experiment_end(trials)  # at the end, written whatever the clock says
    assert "node b left (lost); the sweep now has 1 node(s)" in view.console.file.getvalue()
    # After Tune's last snapshot: every ended trial's checkpoints go, a running (unfinished) one's stay.
    assert not list(folders[0].glob("checkpoint_*")) and len(list(folders[1].glob("checkpoint_*"))) == 2
    assert writes == [1000.0, 1001.0, 1001.0]
    assert {r["trial_id"]: (r["status"], r["steps"]) for r in rows(tmp_path / "trials.csv")} == {
        "aaaa0001": ("complete", "200"), "aaaa0002": ("running", "0")}


def test_console_renders_the_trial_table_and_header():
    from rich.console import Console

    from cifarray.tune.console import SweepConsole
    from cifarray.tune.sweep import load

    sweep = load(CI_SWEEP)
    console = Console(record=True, width=160, force_terminal=False)
    view = SweepConsole("/nonexistent", sweep, "val_acc", "max", "validation accuracy", total=3, console=console,
                        live=False)
    view.trials = [
        SimpleNamespace(trial_id="aaaa0001", status="TERMINATED", local_path=None,
                        config={"batch_size": 32, "lr": 0.123456, "growth_rate": 6, "num_blocks": 2, "layers_0": 1,
                                "layers_1": 3, "params": 4846, "infeasible": "", "baseline": True},
                        last_result={"step": 60, "val_acc": 0.25}, metric_analysis={"val_acc": {"max": 0.3}}),
        SimpleNamespace(trial_id="aaaa0002", status="TERMINATED", local_path=None,
                        config={"batch_size": 64, "lr": 0.2, "growth_rate": 9, "num_blocks": 3, "layers_0": 4,
                                "layers_1": 4, "layers_2": 4, "params": 21562, "infeasible": "over budget"},
                        last_result={"step": 0, "val_acc": 0.0, "infeasible": True},
                        metric_analysis={"val_acc": {"max": 0.0}}),
        SimpleNamespace(trial_id="aaaa0003", status="RUNNING", local_path=None,
                        config={"batch_size": 32, "lr": 0.05, "growth_rate": 2, "num_blocks": 2, "layers_0": 2,
                                "layers_1": 2, "params": 2040, "infeasible": ""},
                        last_result={"step": 20, "val_acc": 0.1}, metric_analysis={"val_acc": {"max": 0.1}}),
    ]
    console.print(view.renderable())
    text = console.export_text()
    header = next(line for line in text.splitlines() if "trial" in line and "status" in line)
    for col in ("trial", "status", "batch", "lr", "k", "layout", "params", "step", "val_acc"):
        assert col in header, header
    assert "best validation accuracy: 0.3 (aaaa0001)" in text  # the infeasible trial's 0.0 is not a score
    assert "trials 2/3 done" in text
    row = {t: next(line for line in text.splitlines() if t in line and "best" not in line) for t in ("aaaa0001", "aaaa0002", "aaaa0003")}
    assert "complete" in row["aaaa0001"] and "1-3" in row["aaaa0001"] and "4,846" in row["aaaa0001"]
    assert "0.123" in row["aaaa0001"] and "0.3" in row["aaaa0001"]
    assert "infeasible" in row["aaaa0002"] and "21,562" in row["aaaa0002"]
    assert "running" in row["aaaa0003"] and "2-2" in row["aaaa0003"]
    # The sweep's [baseline] trial: starred, with the star explained under the table.
    assert "aaaa0001*" in row["aaaa0001"] and "aaaa0002*" not in text and "aaaa0003*" not in text
    assert "* the sweep's baseline" in text


@pytest.mark.slow
def test_gan_sweep_without_inception_weights_selects_on_a_labelled_fallback(tmp_path):
    out = tmp_path / "gan"
    env_note = "NOT FID"
    result = run_module("cifarray.tune", "--sweep", str(REPO / "sweeps" / "ci_dcgan.toml"), "--synthetic",
                        "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "stats_fd" and env_note in summary["objective_label"]
    assert env_note in result.stdout.splitlines()[0]  # said up front, not discovered afterwards
    best = summary["best"]
    assert "fid" not in best and best["stats_fd"] > 0
    trials = rows(out / "trials.csv")
    assert "best_stats_fd" in trials[0] and not any("fid" == k for k in trials[0])
    assert best["stats_fd"] == pytest.approx(min(float(t["best_stats_fd"]) for t in trials
                                                 if t["status"] == "complete"), abs=1e-6)
    for t in trials:
        assert int(t["params"]) <= 1_000_000
    # The sweep file's [baseline] is its first trial, marked as such in trials.csv, summary.json, the console's
    # lines and the Optuna study; the other trials are sampled.
    import optuna

    from cifarray.tune.searcher import open_storage
    from cifarray.tune.sweep import load

    sweep = load(REPO / "sweeps" / "ci_dcgan.toml")
    marked = [t for t in trials if t["baseline"] == "True"]
    assert len(marked) == 1 and sum(t["baseline"] == "False" for t in trials) == 2, trials
    baseline = marked[0]
    fields = ("lr_g", "lr_d", "label_smoothing")  # trials.csv holds the config's values (g_widths, not g_width)
    assert {k: float(baseline[k]) for k in fields} == pytest.approx({k: sweep.baseline[k] for k in fields})
    assert summary["baseline"]["trial_id"] == baseline["trial_id"] and summary["baseline"]["values"] == sweep.baseline
    assert summary["best"]["baseline"] == (summary["best"]["trial_id"] == baseline["trial_id"])
    study = optuna.load_study(study_name="ci_dcgan", storage=open_storage(out))
    assert [t.number for t in study.trials if t.user_attrs.get("baseline")] == [0]
    assert study.trials[0].user_attrs["trial_id"] == baseline["trial_id"]
    assert study.trials[0].params == pytest.approx(sweep.baseline_sampled)
    assert f"trial {baseline['trial_id']} (baseline) started" in result.stdout
    assert sum("(baseline)" in line and " started" in line for line in result.stdout.splitlines()) == 1


@pytest.mark.parametrize("gpus_per_trial, workers, expected", [
    ("0.5", "2", "--gpus-per-trial 0.5 with --workers-per-trial 2: a fraction of a GPU is for one-worker trials"),
    ("1.5", None, "--gpus-per-trial 1.5 must equal --workers-per-trial 1"),
    ("2", "3", "--gpus-per-trial 2 must equal --workers-per-trial 3"),
    ("-1", None, "--gpus-per-trial must be >= 0"),
])
def test_gpu_shares_that_cannot_work_are_refused_before_ray(tmp_path, gpus_per_trial, workers, expected):
    out = tmp_path / "out"
    args = ["--gpus-per-trial", gpus_per_trial, *(["--workers-per-trial", workers] if workers else [])]
    result = run_cli_here("cifarray.tune", "--sweep", str(CI_SWEEP), "--synthetic", "--out", str(out), *args)
    assert result.returncode == 2 and result.stderr.strip().startswith(f"error: {expected}"), result.stderr
    assert not out.exists()


@pytest.mark.parametrize("cluster, share, expected", [
    ((16, 1.0), 0.25, (4, 4)),  # four trials on one GPU, the node's 16 CPUs shared out: 4 each
    ((16, 2.0), 0.5, (4, 4)),
    ((16, 2.0), 1.0, (2, 8)),
    ((2, 1.0), 0.25, (2, 1)),  # 2 CPUs: only 2 of the 4 GPU shares can run, one CPU each
    ((2, 0.0), 0.0, (2, 1)),  # CPU only: one CPU per trial
])
def test_trials_per_gpu_follow_gpus_over_the_share(cluster, share, expected):
    from cifarray.tune.planning import plan
    from cifarray.tune.runners import RUNNERS

    assert plan(*cluster, share, workers=1, cpus_per_trial=None, max_concurrent=None, trials=8) == expected
    assert plan(*cluster, share, workers=1, cpus_per_trial=None, max_concurrent=1, trials=8)[0] == 1
    # An in-actor trial holds its own CPUs and GPU share (no driver sliver); a TorchTrainer trial's driver holds
    # a sliver of a CPU, and its workers the rest.
    cpus = expected[1]
    assert RUNNERS["tune"].resources(cpus, share) == {"CPU": cpus, **({"GPU": share} if share else {})}
    assert RUNNERS["train"].resources(cpus, share) == {"CPU": 0.01}


def test_gpu_fractions_pack_per_gpu():
    """floor(1 / f) trials per GPU: a trial lives on one GPU, so the totals' remainder holds none (ray#5902)."""
    from cifarray.tune.planning import plan

    assert plan(32, 8.0, 0.3, workers=1, cpus_per_trial=None, max_concurrent=None, trials=100) == (24, 1)  # not 26
    assert plan(16, 3.0, 0.4, workers=1, cpus_per_trial=None, max_concurrent=None, trials=100) == (6, 2)  # not 7


def test_the_trial_runner_follows_the_workers_per_trial_and_cannot_change_on_resume(tmp_path):
    import shutil

    from cifarray.tune.runners import trial_runner

    assert [trial_runner(*a).name for a in (("auto", 1), ("auto", 2), ("train", 1))] == ["tune", "train", "train"]
    out = tmp_path / "sweep"
    (out / "tune").mkdir(parents=True)
    shutil.copyfile(CI_SWEEP, out / "sweep.toml")
    (out / "tune_args.json").write_text(json.dumps({"synthetic": True, "trial_runner": "tune"}))
    result = run_cli_here("cifarray.tune", "--out", str(out), "--resume", "--trial-runner", "train")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: --trial-runner cannot change when resuming: {out} runs its trials with tune (unfinished trials "
        "continue from that runner's checkpoints); drop --trial-runner"), result.stderr
    # An experiment from before --trial-runner existed ran its trials through TorchTrainer, and resumes so.
    (out / "tune_args.json").write_text(json.dumps({"synthetic": True}))
    result = run_cli_here("cifarray.tune", "--out", str(out), "--resume", "--trial-runner", "tune")
    assert result.returncode == 2 and "runs its trials with train" in result.stderr, result.stderr


def test_a_resume_whose_optuna_study_is_missing_is_refused_in_one_line_before_ray(tmp_path):
    import shutil

    out = tmp_path / "sweep"
    (out / "tune").mkdir(parents=True)
    shutil.copyfile(CI_SWEEP, out / "sweep.toml")
    (out / "tune_args.json").write_text(json.dumps({"synthetic": True, "trial_runner": "tune", "study": "optuna.db"}))
    result = run_cli_here("cifarray.tune", "--out", str(out), "--resume")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: --resume: {out / 'optuna.db'}, the sweep's Optuna study, is missing; put it back (a backup, or "
        "the folder it was moved from), or start a new sweep in another --out"), result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["sweep.toml", "tune", "tune_args.json"]  # nothing written


def test_a_resume_that_would_unpickle_what_other_users_could_write_is_refused_in_one_line(tmp_path):
    import shutil

    out = tmp_path / "sweep"
    (out / "tune" / "trial_1").mkdir(parents=True)
    shutil.copyfile(CI_SWEEP, out / "sweep.toml")
    (out / "tune_args.json").write_text(json.dumps({"synthetic": True, "trial_runner": "tune", "study": "optuna.db"}))
    state = out / "tune" / "searcher-state-2026-12-04.pkl"
    state.write_bytes(b"not read")
    for path, mode, why in ((out / "tune" / "trial_1", 0o777, "mode 0777: writable by every user"),
                            (state, 0o666, "mode 0666: writable by every user"),
                            (out, 0o757, "mode 0757: writable by every user")):
        before = path.stat().st_mode
        path.chmod(mode)
        result = run_cli_here("cifarray.tune", "--out", str(out), "--resume")
        path.chmod(before)
        assert_one_line_error(result, f"--resume: {path} could have been written by another user ({why})",
                              f"chmod -R go-w {out}")
        assert state.read_bytes() == b"not read"
    os.chown(state, 65534, 65534)  # the tests run as root (Slurm's daemons): as if another user had replaced it
    result = run_cli_here("cifarray.tune", "--out", str(out), "--resume")
    assert_one_line_error(result, f"{state} could have been written by another user (owned by uid 65534)")
    os.chown(state, os.getuid(), os.getgid())
    result = run_cli_here("cifarray.tune", "--out", str(out), "--resume")  # private again: the next check speaks
    assert_one_line_error(result, "the sweep's Optuna study, is missing")


# The tuner's local cluster gets a dashboard on a port picked free; here the first pick is one this script
# holds, as if another process had taken it meanwhile: Ray refuses it, and init_ray starts again on another.
TAKEN_DASHBOARD_PORT = """
import os, socket, types
import ray
from cifarray.train import cluster
taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
picks = []
class Picker(socket.socket):
    def getsockname(self):
        name = super().getsockname()
        picks.append(name[1])
        return (name[0], taken.getsockname()[1]) if len(picks) == 1 else name
cluster.socket = types.SimpleNamespace(socket=Picker)
cluster.init_ray()
print("PICKS", len(picks), "CPU", ray.cluster_resources()["CPU"],
      "API", os.environ["RAY_API_SERVER_ADDRESS"].endswith(f":{picks[-1]}"))
ray.shutdown()
"""


def test_the_tuners_ray_starts_again_when_its_dashboard_port_was_taken_meanwhile():
    proc = subprocess.run([sys.executable, "-c", TAKEN_DASHBOARD_PORT], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the Ray dashboard's port" in proc.stdout and "was taken meanwhile" in proc.stdout, proc.stdout
    assert "PICKS 2 CPU" in proc.stdout and "API True" in proc.stdout, proc.stdout


RAY_STOPPED_WITH_THE_DRIVER = """
import sys, time
from cifarray.errors import run_cli
def main(argv):
    from cifarray.train import cluster
    from ray import tune
    cluster.init_ray()
    tune.register_trainable("noop", lambda config: None)  # Tune's exit hook then talks to Ray's GCS
    print("up", flush=True)
    time.sleep(600)
run_cli(main)
"""


def test_sigterm_to_the_whole_process_group_ends_a_local_ray_run_at_once():
    """`timeout`, `kill -- -PGID` and service managers signal the driver and the local Ray it started alike. With
    Ray's GCS gone, Ray's and Tune's exit hooks waited 60 s for it and ended in a fatal log (measured: a sweep
    took 60 s to exit); now the driver says "interrupted" and exits 130 after at most errors.SHUTDOWN_GRACE_S."""
    proc = subprocess.Popen([sys.executable, "-c", RAY_STOPPED_WITH_THE_DRIVER], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up", proc.stderr.read()[-3000:]
        t = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=45)
        took = time.time() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "interrupted" in err.splitlines(), err[-3000:]
    assert took < 30 and "Failed to connect to GCS" not in err, (took, err[-3000:])


SAME_TRIAL_THREE_WAYS = """
import json, sys
from pathlib import Path
import ray
from ray import tune
from cifarray.data.synth import write_synthetic
from cifarray.family import Objective, RunContext
from cifarray.tune.runners import RUNNERS
from cifarray.tune.sweep import load
from cifarray.tune.trial import run_trial

root = Path(sys.argv[1])
sweep = load(sys.argv[2])
data = write_synthetic(root / "data", train_per_class=30, test_per_class=5, seed=1, difficulty="hard")
base = {**sweep.train, "data_dir": str(data), "synthetic": False, "no_verify": True, "workers": 1, "gpu": False,
        "cpus_per_worker": 1, "checkpoint_every": sweep.eval_every}
layout = {"batch_size": 32, "growth_rate": 4, "num_blocks": 2, "layers_0": 1, "layers_1": 2, "params": 0,
          "infeasible": ""}
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

def sweep_of(name, runner, lrs):
    runner = RUNNERS[runner]
    trainable = tune.with_parameters(run_trial, sweep=sweep, base=base, out=str(root / name),
                                     objective=Objective("val_acc", "max", "validation accuracy"),
                                     context=RunContext(), runner=runner)
    tuner = tune.Tuner(tune.with_resources(trainable, runner.resources(1, 0)),
                       param_space={**layout, "lr": tune.grid_search(lrs)},
                       tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=runner.reuse_actors),
                       run_config=tune.RunConfig(name="tune", storage_path=str(root / name), verbose=0))
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    # In the order Tune ran them (one at a time, as the grid lists them).
    return sorted((root / name / "trials").iterdir(), key=lambda d: json.loads((d / "trial.json").read_text())["entered"])

# The config first in a fresh actor, then again in the same actor after a trial of another learning rate.
in_actor = sweep_of("reused", "tune", [0.2, 0.05, 0.2])
runs = {"fresh": in_actor[0], "reused": in_actor[-1], "trainer": sweep_of("trainer", "train", [0.2])[0]}
print("RUNS", json.dumps({k: str(v) for k, v in runs.items()}))
"""


@pytest.mark.slow
def test_a_trial_trains_bit_identically_in_a_fresh_actor_a_reused_one_and_through_torchtrainer(tmp_path):
    """The same trial config three ways: first in a fresh Tune actor; third in that actor, after a trial of
    another learning rate, with its data set cached; and through a TorchTrainer. The losses, accuracies and final
    weights are identical bit for bit: a trial's result does not depend on what ran before it in the actor, nor on
    the runner. (The fresh trial once had a sweep of its own, in an actor no different from this one's at its first
    trial: the test took 75 s of the suite then, 56-63 s since.)"""
    proc = subprocess.run([sys.executable, "-c", SAME_TRIAL_THREE_WAYS, str(tmp_path), str(CI_SWEEP)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = {k: Path(v) for k, v in json.loads(proc.stdout.split("RUNS ", 1)[1]).items()}
    trial = {k: json.loads((v / "trial.json").read_text()) for k, v in runs.items()}
    assert {t["runner"] for k, t in trial.items()} == {"tune", "train"}
    reused_actor_trials = list((tmp_path / "reused" / "trials").iterdir())
    reused_actor = {json.loads((d / "trial.json").read_text())["pid"] for d in reused_actor_trials}
    assert reused_actor == {trial["reused"]["pid"]} == {trial["fresh"]["pid"]}  # all three trials ran in one actor
    assert len(reused_actor_trials) == 3 and runs["fresh"] != runs["reused"]  # the reused run came third
    info = {k: json.loads((v / "workers" / "rank0.json").read_text()) for k, v in runs.items()}
    assert info["reused"]["data_cached"] and not info["fresh"]["data_cached"]  # the actor kept its data set
    columns = ("step", "loss", "train_acc", "val_acc", "lr")
    curves = {k: [tuple(r[c] for c in columns) for r in rows(v / "metrics.csv")] for k, v in runs.items()}
    assert len(curves["fresh"]) == 3 and curves["fresh"][-1][0] == "60"
    assert curves["reused"] == curves["fresh"] == curves["trainer"], curves
    weights = {k: i["params_sha256"] for k, i in info.items()}
    assert len(set(weights.values())) == 1, weights
    finals = {k: {m: json.loads((v / "summary.json").read_text())[m] for m in ("train_acc", "val_acc", "runner")}
              for k, v in runs.items()}
    assert finals["reused"] == finals["fresh"] and finals["trainer"]["runner"] == "ray-train"
    assert {m: finals["trainer"][m] for m in ("train_acc", "val_acc")} == \
        {m: finals["fresh"][m] for m in ("train_acc", "val_acc")}


# One tiny one-worker trial of 200 steps (the bench's sweep, cifarray/bench/sweep.py), evaluated every 20 steps,
# one ASHA rung near the end.
def one_long_trial() -> str:
    from cifarray.bench.sweep import SWEEP

    return SWEEP.format(trials=1, steps=200, half=20, grace=180)


@pytest.mark.slow
def test_an_in_actor_trial_whose_actor_is_killed_restarts_from_its_checkpoint_and_ends_as_if_uninterrupted(tmp_path):
    """Tune's FailureConfig on the in-actor path: the trial's actor process is SIGKILLed mid-trial; Tune starts a
    new actor, which resumes from the trial's newest checkpoint (Tune's own, in OUT/tune) and finishes with the
    weights and curve of a run that was never interrupted (the same config trained alone: train_alone)."""
    sweep = write_sweep(tmp_path / "long.toml", one_long_trial())
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cifarray.tune", "--sweep", str(sweep), "--synthetic", "--out",
                             str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            folders = list((out / "trials").glob("*/last_checkpoint.json")) if (out / "trials").is_dir() else []
            if folders and json.loads(folders[0].read_text())["step"] >= 40:
                break
            assert proc.poll() is None and time.time() < deadline, "the trial ended before it could be killed"
            time.sleep(0.1)
        trial = folders[0].parent
        actor = json.loads((trial / "workers" / "rank0.json").read_text())
        assert actor["runner"] == "tune" and actor["attempt"] == 0
        os.kill(actor["pid"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    restarted = json.loads((trial / "workers" / "rank0.json").read_text())
    assert restarted["pid"] != actor["pid"] and restarted["attempt"] == 1
    assert restarted["start_step"] >= 40 and restarted["start_step"] % 20 == 0, restarted
    assert json.loads((trial / "summary.json").read_text())["status"] == "complete"
    assert rows(out / "trials.csv")[0]["status"] == "complete"
    other = tmp_path / "whole"
    train_alone(trial, other)
    curve = {d: [(r["step"], r["loss"], r["val_acc"]) for r in rows(d / "metrics.csv")] for d in (trial, other)}
    assert curve[trial] == curve[other] and [int(s) for s, _, _ in curve[trial]] == list(range(20, 201, 20))
    sha = {d: json.loads((d / "workers" / "rank0.json").read_text())["params_sha256"] for d in (trial, other)}
    assert sha[trial] == sha[other]


@pytest.mark.slow
def test_a_trial_that_diverges_is_recorded_as_diverged_and_the_sweep_goes_on(tmp_path):
    """Its NaN loss is reported with the objective at its worst: Tune refuses a result without the metric, and
    the whole sweep used to end with that ValueError (on both runners) at the first diverging trial."""
    from cifarray.bench.sweep import SWEEP

    text = SWEEP.format(trials=2, steps=60, half=20, grace=20).replace("log_every = 20", "log_every = 5")
    sweep = write_sweep(tmp_path / "div.toml", text.replace("lr = { loguniform = [0.05, 0.5] }",
                                                            "lr = { choice = [1e6, 0.1] }"))
    result = run_module("cifarray.tune", "--sweep", str(sweep), "--synthetic", "--out", str(tmp_path / "out"),
                        "--max-concurrent", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    by = {float(t["lr"]): t for t in rows(tmp_path / "out" / "trials.csv")}
    assert by[1e6]["status"] == "diverged" and by[0.1]["status"] == "complete", by
    # The first logged step whose loss is not finite: 5 in bf16 on the EPYCs with avx512_bf16, 10 in fp32, where the
    # loss at step 5 was still 1.2e14. The rows before it are kept; Optuna heard of the step once (no warning).
    step = int(re.search(r"trial \w+ diverged at step (\d+)", result.stdout).group(1))
    logged = tmp_path / "out" / "trials" / by[1e6]["trial_id"] / "metrics.csv"
    kept = rows(logged) if logged.exists() else []
    assert step % 5 == 0 and [int(r["step"]) for r in kept] == list(range(5, step, 5)), (step, kept)
    assert "1 complete, 1 diverged" in result.stdout and "already reported" not in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["best"]["trial_id"] == by[0.1]["trial_id"]


def test_a_long_console_event_stays_one_line_in_a_log(tmp_path):
    """Off a TTY Rich falls back to 80 columns; a Slurm .out file got each long event split over two lines."""
    import io

    from rich.console import Console

    from cifarray.tune.console import SweepConsole
    from cifarray.tune.sweep import load

    log = io.StringIO()
    view = SweepConsole(str(tmp_path), load(CI_SWEEP), "val_acc", "max", "validation accuracy", total=1,
                        console=Console(file=log, force_terminal=False), live=False)
    event = "trial 3767a15c started: " + "  ".join(f"key_{i}=value_{i}" for i in range(12))
    assert len(event) > 200
    view._event(event)
    view.on_step_end(0, [])  # the periodic status line
    lines = log.getvalue().splitlines()
    assert lines[0] == event and len(lines) == 2, lines


def test_a_lost_node_is_given_back_to_the_trials_failure_budget_and_a_code_error_is_not(tmp_path):
    from types import SimpleNamespace

    from cifarray.tune.elastic import MAX_NODE_LOSSES, NodeLoss, Nodes

    def node(nid, name, alive=True):
        return {"NodeID": nid, "Alive": alive, "Labels": {"slurm-node": name}, "Resources": {"CPU": 2},
                "NodeManagerAddress": f"10.0.0.{nid[1:]}"}

    cluster = [[node("n1", "node1"), node("n2", "node2")], set()]
    nodes = Nodes(read=lambda: (cluster[0], cluster[1]))
    assert nodes.poll(force=True) == []  # the first look says nothing: the sweep's first line did
    cluster[0] = [node("n1", "node1"), node("n2", "node2"), node("n3", "node3")]
    assert nodes.poll(force=True) == ["node node3 joined: 2 CPU(s), 0 GPU(s); the sweep now has 3 node(s), 6 CPU(s), "
                                      "0 GPU(s)"]
    error = tmp_path / "error.txt"

    def trial(tid, on, failures):
        return SimpleNamespace(trial_id=tid, last_result={"ray_node": on}, error_file=str(error), local_path="x",
                               run_metadata=SimpleNamespace(num_failures=failures),
                               latest_checkpoint_result=SimpleNamespace(metrics={"step": 400}))

    loss = NodeLoss()
    lost = trial("aaaa", "n3", 0)
    loss.seen(lost)
    loss.reported(lost, lost.last_result)
    cluster[0] = [node("n1", "node1"), node("n2", "node2"), node("n3", "node3", alive=False)]
    error.write_text("Failure # 1\nActorDiedError: The actor died because its node has died.")
    lost.run_metadata.num_failures = 1  # as Tune counted it
    # The console polls as Tune retries the trial: the node's line, then the trial's.
    assert nodes.poll(force=True) == ["node node3 left (lost); the sweep now has 2 node(s), 4 CPU(s), 0 GPU(s)"]
    assert loss.on_recover(lost, nodes) == "trial aaaa: node node3 lost; it continues from step 400 (its last " \
                                           "checkpoint) on another node"
    assert lost.run_metadata.num_failures == 0  # given back
    code = trial("bbbb", "n1", 0)  # the training code raised on a node that lives on: its one retry is spent
    loss.seen(code)
    loss.reported(code, code.last_result)
    error.write_text("Failure # 1\nRayTaskError(ValueError): boom")
    code.run_metadata.num_failures = 1
    assert loss.on_recover(code, nodes).startswith("trial bbbb failed and is retried from step 400")
    assert code.run_metadata.num_failures == 1
    # Node2 drains: its trial said it saved, and its actor then died with the raylet, the node still listed alive.
    cluster[1] = {"n2"}
    assert nodes.poll(force=True)[0].startswith("node node2 is draining")
    drained = trial("cccc", "n2", 1)  # one failure of its own before
    drained.last_result["drained"] = 1
    loss.seen(drained)
    loss.reported(drained, drained.last_result)
    error.write_text("Failure # 2\nThe actor died unexpectedly before finishing this task.")
    drained.run_metadata.num_failures = 2  # whether or not Tune counted it, the trial's budget is as before
    assert loss.on_recover(drained, nodes) == "trial cccc: node node2 drained; it continues from step 400 (its last " \
                                              "checkpoint) on another node"
    assert drained.run_metadata.num_failures == 1
    # Another trial on node2 had not reported since the drain began; node2 has gone by the time Tune retries it.
    cluster[0][1], cluster[1] = node("n2", "node2", alive=False), set()
    assert nodes.poll(force=True)[0].startswith("node node2 left (drained)")
    late = trial("dddd", "n2", 0)
    loss.seen(late)
    loss.reported(late, late.last_result)
    error.write_text("Failure # 1\nThe actor died unexpectedly before finishing this task.")
    assert "trial dddd: node node2 drained" in loss.on_recover(late, nodes) and late.run_metadata.num_failures == 0
    # A trial restored on node1 (Tune's last_result is now its checkpoint's: node2's drained save) loses node1
    # before its first report there: the line names node1 from Ray's error, not the node2 of its last attempt.
    cluster[0] = [node("n1", "node1", alive=False), node("n3", "node3", alive=False)]
    nodes.poll(force=True)
    loss.seen(drained)  # its retry started; nothing reported since
    error.write_text("Failure # 3\nActorDiedError: The actor died unexpectedly before finishing this task.\n"
                     "\tclass_name: ImplicitFunc\n\tip: 10.0.0.1\nThe actor is dead because its node has died.")
    drained.run_metadata.num_failures = 2
    assert loss.on_recover(drained, nodes) == "trial cccc: node node1 lost; it continues from step 400 (its last " \
                                              "checkpoint) on another node"
    assert drained.run_metadata.num_failures == 1
    loss.seen(drained)  # and once more, where Ray's error names no IP that one node had
    error.write_text("Failure # 4\nThe actor is dead because its node has died.")
    drained.run_metadata.num_failures = 2
    assert loss.on_recover(drained, nodes).startswith("trial cccc: its node lost; it continues from step 400")
    for _ in range(MAX_NODE_LOSSES + 1):  # a trial that loses every node it gets is stopped in the end
        lost.run_metadata.num_failures += 1
        loss.on_recover(lost, nodes)
    assert lost.run_metadata.num_failures == 2


def test_rays_messages_of_a_node_gone_stay_out_of_the_sweeps_output(capsys):
    """The console says a node left in one line; Ray's dead-raylet log tail and the GCS's failed bundle removals
    (40 lines a node) are not printed, while a trial's own output still is."""
    from ray._private import worker

    from cifarray.tune.elastic import quiet_node_losses

    quiet_node_losses()
    quiet_node_losses()  # a second console in the same process does not wrap twice
    for pid, line in [("raylet", "Raylet is terminated. Termination is unexpected. Last 20 lines"),
                      ("raylet", "The node with node id: 26049 has been marked dead because the detector ..."),
                      ("gcs_server", "[E] Failed to remove 1 bundle(s) for placement group 4bec at node c42"),
                      ("1234", "trial output: Restored from checkpoint")]:
        worker.print_worker_logs({"pid": pid, "lines": [line], "is_err": False, "ip": "1.2.3.4"}, sys.stdout)
    out = capsys.readouterr().out
    assert "trial output: Restored from checkpoint" in out
    assert "Raylet is terminated" not in out and "marked dead" not in out and "bundle" not in out


def test_the_summary_says_how_far_the_best_trial_is_from_the_baseline_and_that_one_seed_each_may_be_noise(capsys):
    from cifarray.tune.results import print_summary

    summary = {"status": "complete", "trials": 3, "by_status": {"complete": 3}, "total_steps": 300,
               "infeasible_steps": 0, "seconds": 12.0, "objective": "val_acc", "synthetic_data": False,
               "best": {"trial_id": "b", "params": 9000, "val_acc": 0.31, "test_acc": 0.3, "baseline": False},
               "baseline": {"trial_id": "a", "params": 8000, "val_acc": 0.25, "status": "complete", "steps": 100}}
    print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("best trial b: 9,000 params, val_acc 0.3100") and "baseline" not in lines[1]
    assert lines[2] == ("baseline trial a: 8,000 params, val_acc 0.2500; the best trial's margin over it: +0.0600, "
                        "from one seed each (part of it may be seed noise)")
    summary["baseline"].update(val_acc=None, status="early-stopped", steps=40)
    print_summary(summary)
    assert capsys.readouterr().out.splitlines()[2] == "baseline trial a: 8,000 params, early-stopped at step 40"
    summary["best"]["baseline"] = True
    print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("(the sweep's baseline)") and not any(line.startswith("baseline trial") for line in lines)


def test_a_summary_write_killed_halfway_leaves_the_previous_summary_whole(tmp_path, monkeypatch):
    """A resume reads OUT/summary.json to decide whether the search and its test evaluation are done."""
    import json
    import pathlib

    from cifarray.tune.results import SUMMARY, write_summary

    write_summary(tmp_path, {"status": "interrupted", "trials": 2})
    real = pathlib.Path.write_text

    def dies_halfway(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # the kill, with half the text written

    monkeypatch.setattr(pathlib.Path, "write_text", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        write_summary(tmp_path, {"status": "complete", "trials": 2, "best": {"trial_id": "a" * 8}})
    monkeypatch.undo()
    assert json.loads((tmp_path / SUMMARY).read_text()) == {"status": "interrupted", "trials": 2}


# Tiny DenseNets whose trials all fit the budget and run to the end (ASHA's one rung is the last report).
CONFIRM_SWEEP = """description = "tests: tiny DenseNets confirmed over seeds"
model = "densenet"
trials = 3
seed = 1

[train]
steps = 60
augment = "basic"
eval_every = 20
log_every = 20
val_size = 500
param_budget = 20000
synthetic_train_per_class = 30
synthetic_test_per_class = 5
init_channels = 8
batch_size = 32

[asha]
grace_period = 59
reduction_factor = 2

[space]
"""


def confirmed_runs(out: Path) -> dict[tuple[str, int], dict]:
    """(configuration, seed) -> what its run folder says it trained and reached."""
    found = {}
    for d in (out / "confirm" / "trials").iterdir():
        config, summary = (json.loads((d / name).read_text()) for name in ("config.json", "summary.json"))
        found[next(c["name"] for c in json.loads((out / "confirm" / "plan.json").read_text())["configs"]
                   if config["seed"] in c["seeds"]), config["seed"]] = {**summary, "dir": d, "trained": config}
    return found


@pytest.mark.slow
def test_a_confirmation_over_fresh_seeds_finds_a_configuration_no_better_than_itself_and_resumes_after_sigkill(
        tmp_path):
    """`--confirm 2:3` after a search of two tiny DenseNets, its baseline and one searched (so the top 2 searched
    configurations are the one there is): SIGKILLed once two confirmation runs have finished, resumed, and the runs
    the kill stopped mid-training compared with the same runs trained uninterrupted.

    The space holds one configuration, the baseline's: the searched trial is the same configuration, so the two
    confirmed configurations differ only by their seeds, and must be reported as not distinguishable."""
    sweep = write_sweep(tmp_path / "tiny.toml", CONFIRM_SWEEP.replace("trials = 3", "trials = 2")
                        + "lr = { choice = [0.3] }\ngrowth_rate = { choice = [2] }\n[baseline]\nlr = 0.3\n"
                        "growth_rate = 2\n")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cifarray.tune", "--sweep", str(sweep), "--synthetic", "--out", str(out),
           "--confirm", "2:3"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: set[int] = set()
    runs = out / "confirm" / "trials"
    try:
        # The runs still training are frozen until Tune's snapshot of the confirmation holds the finished ones.
        done, interrupted = freeze_runs_in_training(runs, first, started, 2, time.time() + 600)
        wait_until(lambda: all(snapshot_status(out / "confirm", d.name) == "TERMINATED" for d in done), 60)
        before = {d.name: digest(d / "metrics.csv") for d in done}
        started |= descendants(first.pid)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # The search had ended and been summarised without the test split; the confirmation had not read it either.
    search = json.loads((out / "summary.json").read_text())
    search_ended = (out / "summary.json").stat().st_mtime
    assert search["status"] == "complete" and "confirmation" not in search
    assert not any(k.startswith("test_") for k in search["best"]), search["best"]
    assert not (out / "confirm" / "test_evaluations.jsonl").exists()
    result = run_module("cifarray.tune", "--out", str(out), "--resume", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    for name, h in before.items():  # the runs that had finished were not trained again
        assert digest(runs / name / "metrics.csv") == h
    summary = json.loads((out / "summary.json").read_text())
    confirmation = summary["confirmation"]
    assert confirmation["status"] == "complete" and confirmation["figure"] == "confirmation.png"
    assert (out / "confirmation.png").read_bytes()[:8] == PNG and "confirmation.png" in summary["figures"]
    # The plan: the search's top 2 trials besides the baseline (here its one searched trial), then the baseline.
    trials = rows(out / "trials.csv")
    assert {t["status"] for t in trials} == {"complete"} and len(trials) == 2, trials
    searched, baseline = (next(t["trial_id"] for t in trials if t["baseline"] == flag) for flag in ("False", "True"))
    configs = confirmation["configs"]
    assert [(c["name"], c["trial_id"]) for c in configs] == [("top1", searched), ("baseline", baseline)]
    assert configs[0]["search_value"] == pytest.approx(
        json.loads((out / "trials" / searched / "summary.json").read_text())["val_acc"], abs=1e-6)
    seeds = [s for c in configs for s in (r["seed"] for r in c["runs"])]
    assert len(seeds) == 3 * len(configs) == len(set(seeds)) and 0 not in seeds  # fresh seeds: the search used 0
    # Each run trained its configuration with its seed to the last step; the table is what the runs reached.
    found = confirmed_runs(out)
    assert len(found) == 3 * len(configs)
    for c in configs:
        vals = []
        for r in c["runs"]:
            run = found[c["name"], r["seed"]]
            assert run["steps"] == 60 and run["test_acc"] is None  # a run never evaluates the test split itself
            assert (run["trained"]["lr"], run["trained"]["growth_rate"]) == (c["values"]["lr"], c["values"]["growth_rate"])
            assert r["val_acc"] == pytest.approx(run["val_acc"], abs=1e-6)
            vals.append(run["val_acc"])
        mean = sum(vals) / 3
        std = (sum((v - mean) ** 2 for v in vals) / 2) ** 0.5
        assert c["val"]["mean"] == pytest.approx(mean, abs=1e-6) and c["val"]["std"] == pytest.approx(std, abs=1e-6)
        lo, hi = c["val"]["interval"]
        assert lo < mean < hi or std == 0
    means = {c["name"]: c["val"]["mean"] for c in configs}
    assert confirmation["winner"] == max(means, key=means.get)  # on mean validation, not on the search's one draw
    for what, m in confirmation["margins"].items():
        for split in ("val", "test"):
            lo, hi = m[split]["interval"]
            assert m[split]["within_noise"] == (lo <= 0 <= hi) and lo <= m[split]["margin"] <= hi
    margins = confirmation["margins"]  # over the runner-up, and over the baseline unless it won
    assert "runner_up" in margins and ("baseline" in margins) == (confirmation["winner"] != "baseline"), margins
    # The same configuration confirmed twice: other seeds, other values, and no difference claimed.
    assert configs[0]["values"] == configs[1]["values"] and configs[0]["val"]["values"] != configs[1]["val"]["values"]
    assert margins["runner_up"]["val"]["within_noise"], margins
    assert "val_acc" in result.stdout and "within noise (not distinguishable with these seeds)" in result.stdout
    # The test split: read once per confirmed run, after the search had ended and every run had trained.
    evaluations = [json.loads(line) for line in (out / "confirm" / "test_evaluations.jsonl").read_text().splitlines()]
    assert sorted(e["run"] for e in evaluations) == sorted(run["dir"].name for run in found.values())
    trained = max((run["dir"] / "summary.json").stat().st_mtime for run in found.values())
    assert all(e["evaluated"] >= max(search_ended, trained) - 1e-3 for e in evaluations)
    assert "confirmation (2:3)" in result.stdout and f"winner {confirmation['winner']} over the runner-up" in result.stdout
    # As if it had not been interrupted: each run the kill stopped mid-training, trained again uninterrupted from its
    # config.json (train_alone), writes the same rows, bit for bit.
    timing = {"images_per_s", "seconds", "attempt"}  # attempt: which start of the run logged the row
    for d in interrupted:
        assert {r["attempt"] for r in rows(d / "metrics.csv")} >= {"1"}  # it was resumed after the kill
        train_alone(d, tmp_path / d.name)
        assert ([{k: v for k, v in r.items() if k not in timing} for r in rows(tmp_path / d.name / "metrics.csv")]
                == [{k: v for k, v in r.items() if k not in timing} for r in rows(d / "metrics.csv")])
    # --confirm on a finished sweep's folder, or a second --resume, reports it again, evaluates nothing again, and
    # needs no Ray cluster for it.
    for again in (("--confirm", "2:3"), ("--resume",)):
        shown = run_cli_here("cifarray.tune", "--out", str(out), *again)
        assert shown.returncode == 0 and f"winner {confirmation['winner']} over the runner-up" in shown.stdout
    assert len((out / "confirm" / "test_evaluations.jsonl").read_text().splitlines()) == len(found)


def test_confirm_on_a_search_that_has_not_finished_is_refused_unless_resumed(tmp_path):
    out = tmp_path / "out"
    (out / "tune").mkdir(parents=True)
    shutil.copyfile(CI_SWEEP, out / "sweep.toml")
    (out / "tune_args.json").write_text(json.dumps({"synthetic": True, "sweep": str(out / "sweep.toml")}))
    (out / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    before = sorted(p.name for p in out.iterdir())
    result = run_cli_here("cifarray.tune", "--out", str(out), "--confirm", "2:3")
    assert_one_line_error(result, f"--confirm: the search in {out} has not finished; pass --resume")
    assert sorted(p.name for p in out.iterdir()) == before


def test_confirmation_intervals_agree_with_scipys_welch_test_and_say_within_noise_when_they_hold_zero():
    from scipy import stats

    from cifarray.tune.confirm import margin, spread, welch

    a, b = [0.61, 0.64, 0.62, 0.66], [0.58, 0.57, 0.6]
    diff, lo, hi = welch(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-9) and diff == pytest.approx(sum(a) / 4 - sum(b) / 3)
    s = spread(a)
    t = stats.t.interval(0.95, 3, loc=sum(a) / 4, scale=stats.sem(a))
    assert s["interval"] == pytest.approx(list(t)) and s["std"] == pytest.approx(stats.tstd(a))
    # Accuracy: higher is better. FID: lower is better, so the same numbers read the other way.
    assert margin(a, b, "max")["verdict"] == "better beyond seed noise" and not margin(a, b, "max")["within_noise"]
    assert margin(a, b, "min")["verdict"] == "worse beyond seed noise" and margin(a, b, "min")["margin"] < 0
    near = margin([0.61, 0.64, 0.62], [0.62, 0.60, 0.65], "max")
    assert near["within_noise"] and near["verdict"].startswith("within noise")
    lo, hi = near["interval"]
    assert lo < 0 < hi


def test_a_runs_data_source_is_one_validated_value_read_alike_from_a_config_and_from_config_json(tmp_path):
    from cifarray.config import from_dict, to_dict
    from cifarray.data.source import DataSource
    from cifarray.errors import UserError
    from cifarray.train.config import DenseNetTrainConfig

    cfg = from_dict(DenseNetTrainConfig, {"synthetic": True, "out": str(tmp_path / "run"), "val_size": 300,
                                         "seed": 4, "synthetic_train_per_class": 7})
    source = cfg.data_source()
    assert source == DataSource.of(json.loads(json.dumps(to_dict(cfg))), tmp_path / "run")  # as eval reads it
    assert source.folder == tmp_path / "run" / "data" and not source.verify and source.training_images() == 700
    assert (source.val_size, source.seed, source.procedural.seed) == (300, 4, 4)
    real = from_dict(DenseNetTrainConfig, {"data_dir": str(tmp_path / "cifar"), "no_verify": True}).data_source()
    assert real.folder == tmp_path / "cifar" and real.procedural is None and not real.verify
    with pytest.raises(UserError, match="leaves no training images: the procedural data set has 700"):
        DataSource(source.folder, source.procedural, False, 700, 0).check_fits(batch_size=32, workers=1)
    with pytest.raises(UserError, match="--synthetic-difficulty 'medium' is not one of"):
        from_dict(DenseNetTrainConfig, {"synthetic": True, "synthetic_difficulty": "medium"})
