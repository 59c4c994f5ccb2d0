"""The training engine in this process, through its local session (no Ray): the loop's cadence, and resuming
from the newest checkpoint that loads."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from cifarray.config import to_dict
from cifarray.errors import UserError
from cifarray.rundir import measured, read_metrics
from cifarray.train import runfolder
from cifarray.train.config import DenseNetTrainConfig
from cifarray.train.densenet import FAMILY
from cifarray.train.engine import train
from cifarray.train.session import LocalSession
from conftest import assert_one_line_error, run_cli_here

TINY = dict(synthetic=True, synthetic_train_per_class=12, synthetic_test_per_class=2, synthetic_difficulty="easy",
            val_size=200, growth_rate=4, blocks=(1, 1), init_channels=8, augment="basic", batch_size=32,
            cpus_per_worker=1)


def run_locally(out: Path, keep: int = 2, family=FAMILY, session: LocalSession | None = None,
                **settings) -> LocalSession:
    cfg = DenseNetTrainConfig(**{**TINY, **settings, "out": str(out)})
    runfolder.prepare_run(cfg)  # the procedural data and config.json, as the CLI writes them
    session = session or LocalSession(out)
    session.keep = keep
    train(family, to_dict(cfg) | {"out": str(out)}, session)
    return session


def test_the_loop_logs_evaluates_checkpoints_and_reports_in_order_with_final_files_before_the_final_report(tmp_path):
    evaluated = []

    def evaluate(state, step):
        evaluated.append(step)
        return FAMILY.pieces.evaluate(state, step)

    session = run_locally(tmp_path / "run", family=dataclasses.replace(FAMILY, pieces=dataclasses.replace(FAMILY.pieces, evaluate=evaluate)), steps=12,
                          log_every=2, eval_every=4, checkpoint_every=6)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12] and evaluated == [4, 8, 12]
    # Validation accuracy only where validation ran: curves plot those steps, not repeated copies between them.
    assert [int(r["step"]) for r in rows if measured(r, "val_acc")] == [4, 8, 12]
    # A report at each evaluation or checkpoint step, the checkpoint attached where one was taken, and the
    # last one after summary.json and the weights were written (Tune may end a trial on its final result).
    assert [(m["step"], step) for m, step, _ in session.reports] == [(4, None), (6, 6), (8, None), (12, 12)]
    assert [written for _, _, written in session.reports] == [False, False, False, True]
    assert all("val_acc" in m for m, _, _ in session.reports if m["step"] % 4 == 0)
    assert sorted(p.name for p in (tmp_path / "run" / "ray").iterdir()) == ["checkpoint_0000006",
                                                                                  "checkpoint_0000012"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["runner"] == "local" and summary["steps"] == 12 and (tmp_path / "run" / "model.pt").is_file()


def test_a_run_whose_newest_checkpoint_is_truncated_resumes_from_the_one_before_and_ends_as_if_uninterrupted(
        tmp_path, capfd):
    whole = tmp_path / "whole"
    run_locally(whole, keep=5, steps=12, log_every=2, eval_every=4, checkpoint_every=4)
    # The same run as it stood when killed after its step-8 checkpoint, which a full disk cut short.
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("summary.json", "model.pt", "test_predictions.pt", "config.json"):  # config.json names its --out
        (cut / name).unlink(missing_ok=True)
    shutil.rmtree(cut / "ray" / "checkpoint_0000012")
    state = cut / "ray" / "checkpoint_0000008" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capfd.readouterr()
    run_locally(cut, keep=5, steps=12, log_every=2, eval_every=4, checkpoint_every=4)
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("note: checkpoint")]
    assert len(notes) == 1 and "checkpoint_0000008 does not load (truncated or corrupt" in notes[0], notes
    assert json.loads((cut / "workers" / "rank0.json").read_text())["start_step"] == 4
    # val_acc is measured at evaluation steps (rows between repeat the last one, and a resumed run has none
    # to repeat until it evaluates).
    def curve(run):
        return [(r["step"], r["loss"], r["train_acc"], r["val_acc"] if int(r["step"]) % 4 == 0 else "")
                for r in read_metrics(run / "metrics.csv")]

    assert curve(cut) == curve(whole) and len(curve(whole)) == 6
    sha = [json.loads((d / "workers" / "rank0.json").read_text())["params_sha256"] for d in (whole, cut)]
    assert sha[0] == sha[1]


def test_a_run_resumes_from_the_newest_checkpoint_whichever_runner_wrote_it(tmp_path):
    """A run that Ray Train checkpointed at step 4 and the local runner then took to step 8: Ray's own record still
    names its step-4 folder, and the run resumes from step 8, not 4 (and the same way the other way round)."""
    whole = tmp_path / "whole"
    run_locally(whole, keep=5, steps=12, log_every=2, eval_every=4, checkpoint_every=4)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("summary.json", "model.pt", "test_predictions.pt", "config.json"):
        (cut / name).unlink(missing_ok=True)
    shutil.rmtree(cut / "ray" / "checkpoint_0000012")
    ray_named = cut / "ray" / "checkpoint_2026-12-03_10-00-00.000000"  # how Ray Train names its folders
    (cut / "ray" / "checkpoint_0000004").rename(ray_named)

    class RayNamesItsOwn(LocalSession):
        def latest_checkpoint(self):
            return ray_named

    run_locally(cut, keep=5, session=RayNamesItsOwn(cut), steps=12, log_every=2, eval_every=4, checkpoint_every=4)
    assert json.loads((cut / "workers" / "rank0.json").read_text())["start_step"] == 8
    assert read_metrics(cut / "metrics.csv") and json.loads((cut / "workers" / "rank0.json").read_text())[
        "params_sha256"] == json.loads((whole / "workers" / "rank0.json").read_text())["params_sha256"]
    # Ray's folder the newest: the local runner resumes from it.
    (cut / "summary.json").unlink()
    shutil.rmtree(cut / "ray" / "checkpoint_0000012")
    shutil.rmtree(cut / "ray" / "checkpoint_0000008")
    ray_named.touch()
    run_locally(cut, keep=5, steps=12, log_every=2, eval_every=4, checkpoint_every=4)
    assert json.loads((cut / "workers" / "rank0.json").read_text())["start_step"] == 4


def test_a_run_none_of_whose_checkpoints_loads_says_so_in_one_line(tmp_path):
    out = tmp_path / "run"
    run_locally(out, keep=5, steps=8, log_every=2, eval_every=4, checkpoint_every=4)
    (out / "summary.json").unlink()
    for state in (out / "ray").glob("*/state.pt"):
        state.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"no checkpoint of this run loads \(2 in .*ray; the newest: "
                                        r"corrupt: not a torch file\); move .*ray aside"):
        run_locally(out, keep=5, steps=8, log_every=2, eval_every=4, checkpoint_every=4)
    # The trainer's CLI says it before anything starts.
    args = ["densenet", "--out", str(out), *[f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                             for k, v in TINY.items() if k != "synthetic"],
            "--synthetic", "--steps", "8", "--log-every", "2", "--eval-every", "4", "--checkpoint-every", "4"]
    result = run_cli_here("cifarray.train", *args)
    assert_one_line_error(result, "no checkpoint of this run loads (2 in", f"move {out / 'ray'} aside")
    assert result.stdout.count("note: checkpoint") == 2


def test_a_workers_threads_are_its_cpus_else_omp_num_threads_else_its_share_of_the_node(monkeypatch):
    import os
    from types import SimpleNamespace

    from cifarray.train.engine import worker_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads(SimpleNamespace(cpus_per_worker=5, workers=1)) == 5
    assert worker_threads(SimpleNamespace(cpus_per_worker=None, workers=1)) == 3
    for unset in ("", "0", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert worker_threads(SimpleNamespace(cpus_per_worker=None, workers=2)) == 4
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert worker_threads(SimpleNamespace(cpus_per_worker=None, workers=3)) == 2
