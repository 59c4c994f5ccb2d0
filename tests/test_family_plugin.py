"""A third model family, defined in this file, trains, sweeps and reports with no edit under cifarray/.

The family ("toy": average-pool, then one linear layer) is registered with `cifarray.registry.register`
and run through the project's own command lines. This file is its own entry point
(`python tests/test_family_plugin.py train|tune|report ...`): a user's plugin would be a module that
registers its family and then calls the CLI the same way. Everything the workers and Tune trials
need travels with the family object (Ray pickles what `__main__` defines by value).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cifarray import registry
from cifarray.config import opt
from cifarray.rundir import RunDir, read_metrics
from cifarray.train.config import CommonConfig
from cifarray.family import Display, Family, Objective, Pieces, SweepSpec
from cifarray.train.engine import Worker

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


@dataclass(frozen=True)
class ToyConfig(CommonConfig):
    out: str = opt("runs/toy", "run folder")
    steps: int = opt(60, "optimizer steps")
    batch_size: int = opt(64, "global batch")
    lr: float = opt(0.5, "SGD learning rate")
    pool: int = opt(4, "average-pool size before the linear layer (4: 19,300 parameters, 8: 4,900)")

    # The config owns its parameter count and budget (cifarray.models.budget.enforce_budget asks it).
    def param_count(self) -> int:
        return count(self)

    @property
    def budget(self) -> int:
        return 20_000 if self.param_budget is None else self.param_budget

    def over_budget(self, n: int, budget: int) -> str:
        return f"toy model has {n:,} parameters, over the budget of {budget:,}; raise --pool"


def make_model(cfg: ToyConfig) -> torch.nn.Module:
    side = 32 // cfg.pool
    return torch.nn.Sequential(torch.nn.AvgPool2d(cfg.pool), torch.nn.Flatten(), torch.nn.Linear(3 * side * side, 100))


def count(cfg: ToyConfig) -> int:
    return sum(p.numel() for p in make_model(cfg).parameters())


@dataclass
class ToyState:
    worker: Worker
    model: torch.nn.Module
    train_model: torch.nn.Module
    opt: torch.optim.Optimizer

    @property
    def stateful(self):
        return {"model": self.model, "optimizer": self.opt}

    @property
    def primary(self):
        return self.model


def inputs(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 - 0.5


def build(cfg: ToyConfig, w: Worker) -> ToyState:
    model = make_model(cfg).to(w.device)
    return ToyState(w, model, w.wrap(model), torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9))


def step(s: ToyState, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    data = s.worker.data.train
    logits = s.train_model(inputs(data.images[batch]))
    y = data.labels[batch]
    loss = F.cross_entropy(logits, y)
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    s.opt.step()
    return {"loss": loss.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}


@torch.no_grad()
def accuracy(model: torch.nn.Module, split) -> float:
    return (model(inputs(split.images)).argmax(1) == split.labels).float().mean().item()


def evaluate(s: ToyState, step: int) -> dict[str, float]:
    if step == s.worker.cfg.steps:
        # What a user's family says in a worker must reach the job log, named by trial and rank.
        warnings.warn(f"toy: the last evaluation, at step {step}")
    return {"val_acc": accuracy(s.model, s.worker.data.val)}


def finish(s: ToyState, run: RunDir) -> dict:
    torch.save(s.model.state_dict(), run.path / "model.pt")
    return {"params": count(s.worker.cfg), "val_acc": accuracy(s.model, s.worker.data.val)}


def report(run: RunDir, cfg: ToyConfig) -> list[Path]:
    from cifarray.figures import curves

    return [curves(run, read_metrics(run.metrics), [("loss", ["loss"]), ("accuracy", ["train_acc", "val_acc"])],
                   f"toy, pool {cfg.pool}")]


def test_accuracy(run: RunDir, cfg: ToyConfig, context=None) -> dict:

    model = make_model(cfg)
    model.load_state_dict(torch.load(run.path / "model.pt", weights_only=True))
    return {"test_acc": accuracy(model, cfg.data_source().prepare().test)}


test_accuracy.__test__ = False  # a family piece, not a pytest test


def objective(ctx) -> Objective:
    return Objective("val_acc", "max", "validation accuracy")


TOY = Family(name="toy", config=ToyConfig,
             pieces=Pieces(build=build, step=step, evaluate=evaluate, finish=finish,
                           metric_fields=("loss", "train_acc", "val_acc")),
             sweep=SweepSpec(objective=objective, test_metrics=test_accuracy),
             display=Display(figures=report, description="a linear probe (test plug-in)",
                             progress_keys=("loss", "val_acc"), summary_keys=("params", "steps", "val_acc")))

DATA = ["--synthetic", "--synthetic-difficulty", "easy", "--synthetic-train-per-class", "20",
        "--synthetic-test-per-class", "5"]


def plugin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_family_defined_outside_cifarray_trains_sweeps_and_reports(tmp_path):
    out = tmp_path / "run"
    result = plugin("train", "toy", *DATA, "--val-size", "500", "--steps", "60", "--eval-every", "30",
                    "--checkpoint-every", "30", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "toy" and summary["status"] == "complete" and summary["params"] == 19_300
    assert summary["startup_s"] > 0 and summary["train_s"] > 0 and summary["finish_s"] >= 0  # the engine's timings
    # The loop's time in its two evaluations and its checkpoint at step 30, and in its steps: apart, within it.
    steps_s = sum(float(r["seconds"]) for r in read_metrics(out / "metrics.csv"))
    assert summary["eval_s"] > 0 and summary["checkpoint_s"] > 0
    # (each rounded in its file: 0.01 s of slack)
    assert steps_s + summary["eval_s"] + summary["checkpoint_s"] <= summary["train_s"] + 0.01, summary
    rows = read_metrics(out / "metrics.csv")
    assert list(rows[0]) == ["step", "loss", "train_acc", "val_acc", "images_per_s", "seconds", "attempt"]
    # It learned (measured val 0.214 at seed 0; chance is 0.01) through the engine's loop, cadence and final files.
    assert [(r["step"], r["val_acc"] != "") for r in rows] == [("30", True), ("50", False), ("60", True)]
    assert summary["val_acc"] > 0.1 and (out / "model.pt").is_file() and (out / "curves.png").is_file()
    # The family's warning is in the job log (stderr): one worker, trained in this process by the local runner, warns
    # as any Python program does (in a sweep below, each Ray worker's warning is one line named by trial and rank).
    assert "UserWarning: toy: the last evaluation, at step 60" in result.stderr, result.stderr[-3000:]
    assert "Reporting training result" not in result.stderr and "Failed to query" not in result.stderr

    # The run's own report command finds the family by the name in summary.json.
    (out / "curves.png").unlink()
    result = plugin("report", str(out))
    assert result.returncode == 0 and (out / "curves.png").is_file(), result.stderr[-2000:]

    # A 2-trial sweep of it: its config keys are the space, its objective selects, its test metric is reported.
    sweep = tmp_path / "toy.toml"
    sweep.write_text('model = "toy"\ntrials = 2\n[train]\nsteps = 40\neval_every = 20\nval_size = 500\n'
                     'synthetic_train_per_class = 20\nsynthetic_test_per_class = 5\nsynthetic_difficulty = "easy"\n'
                     '[asha]\ngrace_period = 20\n[space]\nlr = { loguniform = [0.05, 1.0] }\n'
                     'pool = { choice = [4, 8, 2] }\n')
    result = plugin("tune", "--sweep", str(sweep), "--synthetic", "--out", str(tmp_path / "sweep"))
    assert result.returncode == 0, result.stderr[-3000:]
    done = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert done["model"] == "toy" and done["trials"] == 2 and done["objective"] == "val_acc"
    assert done["best"] is not None and 0 <= done["best"]["test_acc"] <= 1
    # pool 2 has 76,900 parameters, over the family's own 20,000 budget: infeasible, never trained.
    with open(tmp_path / "sweep" / "trials.csv", newline="") as fh:
        trials = list(csv.DictReader(fh))
    over = [t for t in trials if t["pool"] == "2"]
    assert over and all(t["status"] == "infeasible" and t["steps"] == "0" and t["params"] == "76900" for t in over)
    assert not any((tmp_path / "sweep" / "trials" / t["trial_id"]).exists() for t in over)
    assert all(t["status"] in ("complete", "early-stopped") for t in trials if t["pool"] != "2")
    assert done["by_status"].get("infeasible") == len(over) and sum(done["by_status"].values()) == 2
    assert "test_acc" in result.stdout and "lr" in result.stdout
    # Each trained trial's warning names its trial, in the sweep's job log; Tune's INFO per checkpoint does not show.
    for t in trials:
        said = f"[trial {t['trial_id']} rank 0] UserWarning: toy: the last evaluation, at step 40"
        assert (said in result.stderr) == (t["status"] == "complete"), result.stderr[-3000:]
    assert "Checkpoint successfully created" not in result.stderr


def test_an_unknown_family_is_a_one_line_error(tmp_path):
    sweep = tmp_path / "nope.toml"
    sweep.write_text('model = "nope"\n[space]\nlr = { loguniform = [0.05, 1.0] }\n')
    result = subprocess.run([sys.executable, "-m", "cifarray.tune", "--sweep", str(sweep), "--synthetic", "--out",
                             str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {sweep}: model must be one of densenet, dcgan, got 'nope'"


if __name__ == "__main__":
    registry.register(TOY)
    command, argv = sys.argv[1], sys.argv[2:]
    if command == "train":
        from cifarray.train.__main__ import main
    elif command == "tune":
        from cifarray.tune.__main__ import main
    else:
        from cifarray.report import main
    from cifarray.errors import run_cli

    run_cli(main, argv)
