"""Where a short training run's seconds go, phase by phase, for each way a run can execute: one table.

    python -m cifarray.bench startup [--steps 2] [--ways default,ray,ddp] [--small] [--gpu]

Each way runs the real command, `python -m cifarray.train densenet --synthetic --steps N` (the default model and
procedural data; --small: a tiny DenseNet on 1,200 procedural images, as the tests run it), in a fresh process
and a fresh run folder, with $CIFARRAY_PHASES set: the driver and rank 0
mark when each phase ends (cifarray.phases), and this bench times the process from its start to its exit.

Ways: `default` (the command as a user types it: `--runner auto`, which trains one worker in the driver's own
process, no Ray), `ray` (one Ray Train worker, `--runner ray`) and `ddp` (two Ray Train workers, `--workers 2`). A
phase a way does not have (Ray up, for the local runner) says "no Ray". The rows
that only a GPU run has (CUDA initialisation, cuDNN autotuning, CUDA-graph capture, FID's Inception features)
say "needs CUDA" on a CPU run. --gpu passes `--gpu` to every way (the DDP way then needs two GPUs), and
--cuda-graphs passes its value to the one-worker ways (with at least 4 steps, the capture is then a row of its own).
The last lines give each way's total against the default's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cifarray.bench import machine
from cifarray.errors import UserError
from cifarray.phases import ENV, read
from cifarray.rundir import RunDir
from cifarray.train import graphs

WAYS = {"default": ("default", []), "ray": ("Ray Train, 1 worker", ["--runner", "ray"]),
        "ddp": ("Ray Train DDP, 2 workers", ["--workers", "2"])}
# (phase, the mark it starts at, the mark it ends at): "spawn" and "exit" are this bench's own clock.
PHASES = (
    ("interpreter and imports", "spawn", "imported"),
    ("input checks", "imported", "checked"),
    ("Ray up", "checked", "ray_up"),
    ("trainer or controller up", "ray_up", "worker_entered"),
    ("worker set-up (data, model)", "worker_entered", "set_up"),
    ("first step", "set_up", "first_step"),
    ("training", "first_step", "trained"),
    ("final evaluation", "trained", "finished"),
    ("files and figures", "finished", "reported"),
    ("exit", "reported", "exit"),
)
SKIPPABLE = {"ray_up"}  # the local runner starts no Ray
# Costs only a GPU run has, each inside one of the phases above: (row, start mark, end mark). The training step
# sets no cudnn.benchmark, so a run pays no cuDNN autotuning (only `bench gpu` autotunes); FID's Inception features
# are a DCGAN run's, at its first FID evaluation (later ones reuse the cached reference statistics).
GPU_ONLY = (
    ("CUDA initialisation", "cuda_init", "cuda_ready"),
    ("cuDNN autotuning", None, None),
    ("CUDA-graph capture", "graph_capture", "graph_captured"),
    ("FID Inception features", "fid", "fid_done"),
)
SMALL = ["--synthetic-train-per-class", "12", "--synthetic-test-per-class", "2", "--val-size", "200", "--growth-rate",
         "4", "--blocks", "1,1", "--init-channels", "8", "--augment", "basic", "--batch-size", "32"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("startup", help="seconds of a short run, phase by phase, for each way a run executes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="training steps of each run (default 2)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"which ways, in order (default {','.join(WAYS)})")
    p.add_argument("--small", action="store_true", help="a tiny DenseNet on little procedural data (the tests')")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (one per worker: ddp needs two)")
    p.add_argument("--cuda-graphs", choices=graphs.MODES,
                   help="the one-worker ways' --cuda-graphs (default: the run's own default)")
    p.set_defaults(func=run)


def phases_of(marks: list[dict], spawned: float, exited: float) -> dict[str, float | None]:
    """Seconds per phase from one run's marks (rank 0's, where the workers mark: the rank that writes the files).

    A phase whose end mark the run may skip (SKIPPABLE) is None when skipped; the next phase starts where the
    one before it ended."""
    at = {"spawn": spawned, "exit": exited, **rank0_marks(marks)}
    missing = [end for _, _, end in PHASES if end not in at and end not in SKIPPABLE]
    if missing:
        raise RuntimeError(f"the run marked no {', '.join(missing)}: marks {sorted(at)}")
    phases: dict[str, float | None] = {}
    since = "spawn"
    for name, _, end in PHASES:
        if end not in at:
            phases[name] = None
            continue
        phases[name], since = at[end] - at[since], end
    return phases


def _run_way(way: str, args: argparse.Namespace, tmp: Path) -> dict:
    label, extra = WAYS[way]
    out, marks = tmp / way, tmp / f"{way}.phases"
    cmd = [sys.executable, "-m", "cifarray.train", "densenet", "--synthetic", "--steps", str(args.steps),
           "--out", str(out), *(SMALL if args.small else []), *(["--gpu"] if args.gpu else []), *extra,
           *(["--cuda-graphs", args.cuda_graphs] if args.cuda_graphs and way != "ddp" else [])]
    print(f"bench startup: {way}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    spawned = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, ENV: str(marks)})
    exited = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"the {way} run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    summary = RunDir(out).read_summary()
    found = read(marks)
    return {"way": way, "label": label, "phases": phases_of(found, spawned, exited), "total": exited - spawned,
            "gpu": gpu_rows(found), "precision": summary["precision"], "params": summary.get("params"),
            "runner": summary["runner"]}


def rank0_marks(marks: list[dict]) -> dict[str, float]:
    """When each mark was first made by rank 0 (the rank that writes the files; a mark with no rank is the
    driver's): the first of each, one attempt."""
    at: dict[str, float] = {}
    for m in marks:
        if m.get("rank", 0) == 0:
            at.setdefault(m["mark"], m["t"])
    return at


def gpu_rows(marks: list[dict]) -> dict[str, str]:
    """Each GPU-only cost of one run, as the table shows it: seconds, or why there is none."""
    at = rank0_marks(marks)
    on_gpu = "cuda_ready" in at  # the engine marks it on a CUDA device
    rows = {}
    for name, start, end in GPU_ONLY:
        if not on_gpu:
            rows[name] = "needs CUDA"
        elif start is None:
            rows[name] = "not used"
        elif start in at and end in at:
            rows[name] = f"{at[end] - at[start]:.2f}"
        else:
            rows[name] = "not in this run"
    return rows


def _gpu_name() -> str:
    import torch

    return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"


def _check_gpus(ways: list[str]) -> None:
    """--gpu: each way needs one GPU per worker here (the runs start a local Ray or none)."""
    import torch

    have = torch.cuda.device_count()
    need = 2 if "ddp" in ways else 1
    if have < need:
        fix = "pass --ways default,ray" if have == 1 else "drop --gpu"
        raise UserError(f"--gpu with --ways {','.join(ways)} needs {need} GPU(s), this machine has {have}; {fix}")


def run(args: argparse.Namespace) -> int:
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or len(set(ways)) != len(ways) or any(w not in WAYS for w in ways):
        raise UserError(f"--ways {args.ways!r}: give each of {', '.join(WAYS)} at most once, comma-separated")
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.gpu:
        _check_gpus(ways)
    with tempfile.TemporaryDirectory(prefix="cifarray-bench-startup-") as tmp:
        rows = [_run_way(way, args, Path(tmp)) for way in ways]
    params = f"{rows[0]['params']:,} params" if rows[0]["params"] else "the default model"
    what = "a tiny DenseNet on little procedural data" if args.small else "the default DenseNet and procedural data"
    where = f"{machine()}, {_gpu_name()}" if args.gpu else machine()
    print(f"bench startup: {where}; a {args.steps}-step `python -m cifarray.train densenet --synthetic` run "
          f"({what}, {params}), precision {rows[0]['precision']}; seconds per phase")
    width = max(len(r["label"]) for r in rows) + 2
    print(f"  {'phase':<30}" + "".join(f"{r['label']:>{width}}" for r in rows))
    for name, _, _ in PHASES:
        print(f"  {name:<30}" + "".join(f"{'no Ray':>{width}}" if r["phases"][name] is None
                                        else f"{r['phases'][name]:>{width}.2f}" for r in rows))
    for name, _, _ in GPU_ONLY:
        print(f"  {name:<30}" + "".join(f"{r['gpu'][name]:>{width}}" for r in rows))
    print(f"  {'total (process start to exit)':<30}" + "".join(f"{r['total']:>{width}.2f}" for r in rows))
    print(f"  {'of which training':<30}" + "".join(f"{r['phases']['training']:>{width}.2f}" for r in rows))
    base = rows[0]
    for r in rows[1:]:
        print(f"ratio ({r['way']} / {base['way']} total): {r['total'] / base['total']:.2f}")
    for r in rows:
        fixed = r["total"] - r["phases"]["training"]
        print(f"{r['way']}: {fixed:.1f} s besides training ({fixed / r['total']:.0%} of the run; runner {r['runner']})")
    return 0
