"""What a sweep trial costs besides its training: the same small sweep with each trial runner, one table.

Each runner runs the same sweep through the real command (`python -m cifarray.tune --trial-runner R`, a fresh
process and local Ray cluster each): --trials one-worker trials of a tiny DenseNet, --steps steps each, on
procedural data. ASHA's only rung falls on the last report, so no trial is stopped early and every trial
trains the same steps under both runners. Per runner it prints the sweep wall (process start to exit: Ray's
start, the trials, the best trial's test evaluation), the sum of the trials' training seconds (each trial's
loop, evaluations and checkpoints included: summary.json's train_s), and the per-trial overhead from each
trial's own timestamps: from entering the trial function (trial.json) to its final files (summary.json's
finished_at), minus its training seconds. A trial that reuses an actor finds torch imported and the data set
loaded; the first trial of each actor also waited for the actor's process to start, shown apart.

What a long sweep costs per trial outside the trial function (the driver's bookkeeping, Tune's, the searcher's)
is in slot-seconds: over a stretch of consecutive finishes, the slots (trials that may run at once) times the
stretch's seconds, less the seconds the trials finishing in it spent inside the trial function, per trial. It is
printed for the whole sweep and for its first tenth and its last 40 %, which differ when that cost grows with the
sweep (`--trials 1000 --steps 4 --runners tune` shows it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cifarray.bench import machine
from cifarray.errors import UserError
from cifarray.rundir import RunDir
from cifarray.train.cluster import local_resources
from cifarray.tune.layout import EXPERIMENT, TRIALS

RUNNERS = ("tune", "train")

SWEEP = """# bench sweep: one-worker trials of a tiny DenseNet, none stopped early
description = "bench sweep"
model = "densenet"
trials = {trials}
seed = 0

[train]
steps = {steps}
eval_every = {half}
log_every = {half}
batch_size = 32
growth_rate = 4
blocks = [2, 2]
init_channels = 8
augment = "basic"
val_size = 500
synthetic_train_per_class = 30
synthetic_test_per_class = 5
synthetic_difficulty = "easy"

[asha]
grace_period = {grace}           # one rung, at the last report: no trial is stopped early
reduction_factor = 2

[space]
lr = {{ loguniform = [0.05, 0.5] }}
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="per-trial overhead of the in-actor and TorchTrainer trial runners",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="one-worker trials per runner (default 8)")
    p.add_argument("--steps", type=int, default=40, help="training steps per trial, even, >= 4 (default 40)")
    p.add_argument("--runners", default=",".join(RUNNERS), help="which runners, in order (default tune,train)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the local cluster fits)")
    p.set_defaults(func=run)


def _trial_figures(out: Path) -> list[dict]:
    figures = []
    for folder in sorted((out / TRIALS).iterdir()):
        trial, summary = json.loads((folder / "trial.json").read_text()), RunDir(folder).read_summary()
        wall = summary["finished_at"] - trial["entered"]
        figures.append({"wall": wall, "train_s": summary["train_s"], "overhead": wall - summary["train_s"],
                        "pid": trial["pid"], "process_started": trial.get("process_started"),
                        "entered": trial["entered"], "precision": summary["precision"], "params": summary["params"]})
    return figures


def _sweep(runner: str, args: argparse.Namespace, sweep_file: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "cifarray.tune", "--sweep", str(sweep_file), "--synthetic", "--out", str(out),
           "--trial-runner", runner, *(["--max-concurrent", str(args.max_concurrent)] if args.max_concurrent else [])]
    print(f"bench sweep: {runner}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"the {runner} sweep failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    trials = _trial_figures(out)
    if len(trials) != args.trials:
        raise RuntimeError(f"the {runner} sweep finished {len(trials)} of {args.trials} trials:\n{done.stdout[-2000:]}")
    slots = args.max_concurrent or local_resources()["num_cpus"]  # what the sweep's local Ray counts
    stored = tune_storage(out)
    first = {}
    for t_ in sorted(trials, key=lambda f: f["entered"]):
        first.setdefault(t_["pid"], t_)
    starts = [f["entered"] - f["process_started"] for f in first.values() if f["process_started"]]
    return {"runner": runner, "wall": wall, "train_s": sum(f["train_s"] for f in trials),
            "median": statistics.median(f["overhead"] for f in trials), "max": max(f["overhead"] for f in trials),
            "actors": len(first), "actor_start": statistics.median(starts) if starts else None,
            "precision": trials[0]["precision"], "params": trials[0]["params"], "slots": slots,
            "outside": outside_slot_seconds(trials, slots), "early": outside_slot_seconds(trials, slots, 0.0, 0.1),
            "late": outside_slot_seconds(trials, slots, 0.6, 1.0), "stored": stored}


def tune_storage(out: Path) -> dict[str, int]:
    """Bytes left in OUT/tune (Tune's experiment folder) once the sweep has ended, by what holds them."""
    sizes = {"experiment state": 0, "checkpoints": 0, "trial logs": 0}
    for path in (out / EXPERIMENT).rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(out / EXPERIMENT).parts
        kind = ("checkpoints" if any(p.startswith("checkpoint_") for p in rel) else
                "trial logs" if len(rel) > 1 else "experiment state")
        sizes[kind] += path.stat().st_size
    return sizes


def outside_slot_seconds(trials: list[dict], slots: int, start: float = 0.0, end: float = 1.0) -> float | None:
    """Slot-seconds per trial spent outside the trial function, over the finishes from fraction `start` to `end`
    of the sweep (in finishing order): slots x the stretch's seconds, less its trials' walls, per trial.

    The stretch runs from the finish before its first trial (the sweep's first entry, for the first) to its last
    finish. None when the stretch holds no trial."""
    done = sorted(trials, key=lambda f: f["entered"] + f["wall"])
    lo, hi = int(round(start * len(done))), int(round(end * len(done)))
    if hi <= lo:
        return None
    since = min(f["entered"] for f in done) if lo == 0 else done[lo - 1]["entered"] + done[lo - 1]["wall"]
    until = done[hi - 1]["entered"] + done[hi - 1]["wall"]
    inside = sum(f["wall"] for f in done[lo:hi])
    return (slots * (until - since) - inside) / (hi - lo)


def run(args: argparse.Namespace) -> int:
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    bad = [r for r in runners if r not in RUNNERS]
    if bad or not runners or len(set(runners)) != len(runners):
        raise UserError(f"--runners {args.runners!r}: give each of {', '.join(RUNNERS)} at most once, comma-separated")
    if args.trials < 1 or args.steps < 4 or args.steps % 2 or (args.max_concurrent is not None and args.max_concurrent < 1):
        raise UserError("--trials and --max-concurrent must be at least 1, --steps even and at least 4")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cifarray-bench-sweep-") as tmp:
        sweep_file = Path(tmp) / "bench.toml"
        sweep_file.write_text(SWEEP.format(trials=args.trials, steps=args.steps, half=args.steps // 2,
                                           grace=args.steps - 1))
        for runner in runners:
            rows.append(_sweep(runner, args, sweep_file, Path(tmp) / runner))
    print(f"bench sweep: {machine()}; {args.trials} one-worker trial{'s' * (args.trials != 1)} x {args.steps} steps "
          f"of DenseNet k=4 blocks 2,2 ({rows[0]['params']:,} params), batch 32, precision {rows[0]['precision']}, "
          "no early stopping")
    print(f"  {'runner':<7} {'sweep wall':>10} {'train s (sum)':>13} {'overhead/trial median':>22} {'max':>6} "
          f"{'actors':>6}  actor start (median)")
    for r in rows:
        start = f"{r['actor_start']:.1f} s" if r["actor_start"] is not None else "n/a"
        print(f"  {r['runner']:<7} {r['wall']:>8.1f} s {r['train_s']:>11.1f} s {r['median']:>20.1f} s "
              f"{r['max']:>4.1f} s {r['actors']:>6}  {start}")
    for r in rows:
        parts = [f"{r['outside']:.2f} for all {args.trials}"]
        if r["early"] is not None and r["late"] is not None and args.trials >= 10:
            parts.append(f"{r['early']:.2f} for the first tenth, {r['late']:.2f} for the last 40 %")
        print(f"{r['runner']}: slot-s per trial outside the trial function ({r['slots']} slots): {'; '.join(parts)}")
    for r in rows:
        held = r["stored"]
        print(f"{r['runner']}: OUT/tune after the sweep: {sum(held.values()) / 1e6:.1f} MB (" +
              ", ".join(f"{kind} {n / 1e6:.1f} MB" for kind, n in held.items()) + ")")
    by = {r["runner"]: r for r in rows}
    if "tune" in by:
        print(f"in-actor overhead per trial: {by['tune']['median']:.1f} s")
    if "tune" in by and "train" in by:
        print(f"ratio (train / tune runner overhead): {by['train']['median'] / max(by['tune']['median'], 1e-9):.2f}")
    return 0
