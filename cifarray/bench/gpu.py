"""Where a training step's time goes, on a GPU (or, with small sizes, on the CPU): one table.

Rows: AugMix per batch and in bulk (many batches per call); the model step alone (eager, and compiled
with --compile); the full step (batch order + augmentation + model step, through the DenseNet family's
own `step`); launches per step and the GPU's busy fraction (torch.profiler); the projected 10,000-step
time; on a GPU, the full step again with --cuda-graphs on and its loss curve against eager's; the
DCGAN's D+G step; and the end-to-end wall of a short `python -m cifarray.train` run with its start-up,
training and finish itemised.

Everything except the end-to-end row runs in this process, without Ray, on random uint8 images:
step timings do not depend on the pixels. Times are medians of --repeats timed runs of --steps
steps each, after --warmup steps, with the device synchronised around each run. Sizes default to the
paper recipe on a GPU (batch 512, DCGAN batch 128) and to small ones on the CPU, where the paper sizes
take a quarter of an hour; the model is the paper's on both. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cifarray.config import flag_of
from cifarray.data.augment import AugmentConfig, chunk_batches
from cifarray.data.loader import PreparedData, random_data
from cifarray.errors import UserError
from cifarray.rundir import RunDir


# The paper recipe on a GPU (about 4 minutes on an H100, by the count); on the CPU the same rows at
# sizes that finish in about a minute on 2 cores: the paper sizes took 14 min 52 s there (bf16 EPYC VM).
GPU_SIZES = dict(batch_size=512, gan_batch_size=128, steps=20, warmup=5, chunk=0, e2e_steps=200)
CPU_SIZES = dict(batch_size=64, gan_batch_size=32, steps=4, warmup=2, chunk=4, e2e_steps=20)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu", help="where a training step's time goes (GPU, or CPU with small sizes)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    def sized(key: str) -> str:
        return f"(default {GPU_SIZES[key]} on a GPU, {CPU_SIZES[key]} on the CPU)"

    p.add_argument("--batch-size", type=int, help=f"DenseNet batch, the paper's 512 {sized('batch_size')}")
    p.add_argument("--gan-batch-size", type=int, help=f"DCGAN batch, the paper's 128 {sized('gan_batch_size')}")
    p.add_argument("--growth-rate", type=int, default=8)
    p.add_argument("--blocks", default="5,5,5,5", help="the paper model by default")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp32 (auto: bf16 where native)")
    p.add_argument("--steps", type=int, help=f"steps per timed run {sized('steps')}")
    p.add_argument("--warmup", type=int, help=f"untimed steps first (allocator, cuDNN autotune) {sized('warmup')}")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is reported")
    p.add_argument("--chunk", type=int, help="batches per bulk augmentation call (0: what --augment-chunk 0 "
                   f"picks, 1 GiB) {sized('chunk')}")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd model step")
    p.add_argument("--e2e-steps", type=int,
                   help=f"steps of the end-to-end cifarray.train run (0: skip that row) {sized('e2e_steps')}")
    p.set_defaults(func=run)


def resolve_sizes(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Fill the sizes not given from this device's defaults; returns the names it filled."""
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    filled = [k for k, v in sizes.items() if getattr(args, k) is None]
    for k in filled:
        setattr(args, k, sizes[k])
    return filled


def _say(msg: str) -> None:
    """Progress on stderr, so that stdout holds the table alone."""
    print(f"bench gpu: {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(fn, device: torch.device, steps: int, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        runs.append((time.perf_counter() - t) * 1000 / steps)
    return statistics.median(runs)


def _profile(fn, device: torch.device, steps: int) -> tuple[float, float | None]:
    """(device kernels, or CPU operators, per step; GPU busy fraction or None on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto's own lines ("profiler_start", and on a CPU "gpuGetDeviceCount failed") would break up the
    # table's progress; it reads this when the profiler first starts.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    wall_us = (time.perf_counter() - t) * 1e6
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / wall_us
        return len(kernels) / steps, min(busy, 1.0)
    return sum(1 for e in events if e.name.startswith("aten::")) / steps, None


def _worker(cfg, device: torch.device, data: PreparedData, precision: str, tmp: Path):
    from cifarray.train.engine import Worker

    return Worker.local(cfg, data, tempfile.mkdtemp(dir=tmp), device, precision)


def _e2e(args, device: torch.device, out: Path) -> str:
    cmd = [sys.executable, "-m", "cifarray.train", "densenet", "--synthetic", "--out", str(out / "run"),
           "--steps", str(args.e2e_steps), "--batch-size", str(args.batch_size), "--growth-rate",
           str(args.growth_rate), "--blocks", args.blocks, "--precision", args.precision,
           "--eval-every", str(args.e2e_steps), "--checkpoint-every", str(args.e2e_steps),
           *(["--gpu"] if device.type == "cuda" else ["--synthetic-train-per-class", "40",
                                                      "--synthetic-test-per-class", "10", "--val-size", "500"])]
    t = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if result.returncode != 0:
        return f"failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}"
    s = RunDir(out / "run").read_summary()
    return (f"{wall:.1f} s wall for {args.e2e_steps} steps: worker start-up {s['startup_s']} s, training "
            f"{s['train_s']} s, finish {s['finish_s']} s; the rest is Ray, data and the report")


def _graph_rows(cfg, device: torch.device, data: PreparedData, precision: str, timing: dict, chunk: int,
                tmp: Path) -> list:
    """The full step with --cuda-graphs on: time, kernels, busy fraction, projection, and its loss against eager's."""
    from cifarray.train import densenet

    def fresh(mode: str):
        c = dataclasses.replace(cfg, cuda_graphs=mode)
        torch.manual_seed(0)
        return densenet.build(c, _worker(c, device, data, precision, tmp))

    _say("timing the full step with --cuda-graphs on, and its loss curve against eager's")
    state = fresh("on")
    step = lambda: densenet.step(state, state.worker.sampler.next())  # noqa: E731
    ms = _ms(step, **{**timing, "warmup": max(timing["warmup"], state.graphed.warmup + 1)})
    if state.graphed.graph is None:
        return [("full step, CUDA graph", "n/a", state.graphed.failed)]
    launches, busy = _profile(step, device, chunk)
    # Same seed, batches and augmentation, eager then graphed: the loss curves should agree within noise.
    curves = []
    for mode in ("off", "on"):
        s = fresh(mode)
        curves.append(torch.stack([densenet.step(s, s.worker.sampler.next())["loss"].clone() for _ in range(200)]))
    eager, graphed = (c[100:].mean().item() for c in curves)
    return [("full step, CUDA graph", f"{ms:.2f}", f"captured after {state.graphed.warmup} eager steps"),
            ("kernels per graphed step", f"{launches:.0f}", "torch.profiler (a replay runs them all)"),
            ("GPU busy per graphed step", f"{busy:.0%}", "kernel time / wall"),
            ("projected 10,000 graphed steps", f"{ms * 10:.0f} s", "graphed step x 10,000"),
            ("graphed vs eager loss, steps 101-200", f"{graphed - eager:+.4f}",
             f"mean loss {graphed:.4f} graphed, {eager:.4f} eager (random images: a check, not learning)")]


def run(args: argparse.Namespace) -> int:
    # Run folders of the in-process workers and the end-to-end run: removed however the bench ends.
    with tempfile.TemporaryDirectory(prefix="cifarray-bench-gpu-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, tmp: Path) -> int:
    from cifarray.device import resolve_precision
    from cifarray.train import densenet
    from cifarray.train.config import DenseNetTrainConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; pass --device cpu")
    defaulted = resolve_sizes(args, device)
    if min(args.steps, args.repeats, args.batch_size, args.gan_batch_size) < 1 or min(args.warmup, args.e2e_steps,
                                                                                     args.chunk) < 0:
        raise UserError("--steps, --repeats and the batch sizes must be at least 1; --warmup, --e2e-steps, "
                        "--chunk >= 0")
    precision = resolve_precision(args.precision, device)
    torch.backends.cudnn.benchmark = True
    blocks = tuple(int(b) for b in args.blocks.split(","))
    chunk = args.chunk or chunk_batches(AugmentConfig(), args.batch_size, 10**9)
    cfg = DenseNetTrainConfig(synthetic=True, batch_size=args.batch_size, growth_rate=args.growth_rate,
                              blocks=blocks, steps=10_000, gpu=device.type == "cuda", precision=precision,
                              augment_chunk=chunk)
    data = random_data(max(chunk * args.batch_size, 2048), device)
    torch.manual_seed(0)
    state = densenet.build(cfg, _worker(cfg, device, data, precision, tmp))
    if defaulted:
        shown = ", ".join(f"{flag_of(k)} {getattr(args, k)}" for k in defaulted)
        _say(f"{shown}: the defaults on {'a GPU' if device.type == 'cuda' else 'the CPU'} (pass them to change)")
    timing = dict(device=device, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    # The full step's timed runs hold whole chunks (one bulk call each), after one whole chunk of warm-up.
    step_timing = dict(device=device, steps=-(-args.steps // chunk) * chunk,
                       warmup=chunk * max(1, -(-args.warmup // chunk)), repeats=args.repeats)
    rows = _densenet_rows(args, state, chunk, precision, timing, step_timing)
    rows += _graph_rows(cfg, device, data, precision, step_timing, chunk, tmp) if device.type == "cuda" else [
        ("full step, CUDA graph", "n/a", "needs CUDA")]
    rows += _dcgan_rows(args, device, data, precision, timing, tmp)
    if args.e2e_steps:
        _say(f"running python -m cifarray.train densenet for {args.e2e_steps} steps (Ray start-up included)")
        rows.append(("end-to-end python -m cifarray.train", "", _e2e(args, device, tmp)))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    params = sum(p.numel() for p in state.model.parameters())
    print(f"bench gpu: {name}, torch {torch.__version__}, precision {precision}, DenseNet k={args.growth_rate} "
          f"blocks={args.blocks} ({params:,} params), batch {args.batch_size}")
    width = max(len(r[0]) for r in rows)
    print(f"  {'what':<{width}}  {'ms/value':>9}  note")
    for what, value, note in rows:
        print(f"  {what:<{width}}  {value:>9}  {note}")
    return 0


def _densenet_rows(args: argparse.Namespace, state, chunk: int, precision: str, timing: dict,
                   step_timing: dict) -> list:
    """AugMix per batch and in bulk, the model step (eager, compiled), the full step and its profile."""
    from cifarray.device import channels_last
    from cifarray.train import densenet

    data, device, sampler = state.worker.data, state.worker.device, state.worker.sampler
    raw = data.train.images[:args.batch_size]
    bulk = data.train.images[:chunk * args.batch_size]
    x = channels_last(state.aug(raw, state.worker.gen))
    y = data.train.labels[:args.batch_size]

    def model_step(model=state.train_model):
        with state.worker.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        state.opt.step()

    def full_step():
        densenet.step(state, sampler.next())

    bulk_timing = dict(device=device, steps=1, warmup=1, repeats=args.repeats)
    _say("timing AugMix (one batch, in bulk) and the model step")
    rows = [("AugMix + crop + flip, one batch", f"{_ms(lambda: state.aug(raw, state.worker.gen), **timing):.2f}",
             f"{args.batch_size} images, per batch"),
            ("AugMix + crop + flip, bulk, per batch",
             f"{_ms(lambda: state.aug(bulk, state.worker.gen), **bulk_timing) / chunk:.2f}",
             f"{chunk} batches per call (--augment-chunk), time / {chunk}"),
            ("model step, eager", f"{_ms(model_step, **timing):.2f}", f"{precision}, forward + backward + SGD")]
    if args.compile:
        _say("compiling the model step (torch.compile; a minute or more)")
        t = time.perf_counter()
        compiled = torch.compile(state.model)
        model_step(compiled)
        rows.append(("model step, torch.compile", f"{_ms(lambda: model_step(compiled), **timing):.2f}",
                     f"compiling took {time.perf_counter() - t:.0f} s"))
    _say(f"timing the full step ({step_timing['steps']} steps x {args.repeats}) and profiling it")
    full = _ms(full_step, **step_timing)
    launches, busy = _profile(full_step, device, chunk)
    kernels = "kernels per full step" if device.type == "cuda" else "aten operators per full step"
    return rows + [("full step (order + augment + model)", f"{full:.2f}",
                    f"the family's own step, eager; bulk augmentation, {chunk} batches per call"),
                   (kernels, f"{launches:.0f}", f"torch.profiler, over {chunk} steps"),
                   ("GPU busy per full step", f"{busy:.0%}" if busy is not None else "n/a",
                    "kernel time / wall" if busy is not None else "no GPU"),
                   ("projected 10,000 steps", f"{full * 10:.0f} s", "full step x 10,000")]


def _dcgan_rows(args: argparse.Namespace, device: torch.device, data: PreparedData, precision: str, timing: dict,
                tmp: Path) -> list:
    """The DCGAN's D+G step, eager and (on a GPU) graphed."""
    from cifarray.train import dcgan
    from cifarray.train.config import DCGANTrainConfig

    rows = []
    for mode in ("off", "on") if device.type == "cuda" else ("off",):
        _say(f"timing the DCGAN step{', CUDA graph' if mode == 'on' else ''}")
        gcfg = DCGANTrainConfig(synthetic=True, batch_size=args.gan_batch_size, gpu=device.type == "cuda",
                                precision=precision, cuda_graphs=mode)
        torch.manual_seed(0)
        gstate = dcgan.build(gcfg, _worker(gcfg, device, data, precision, tmp))
        gan = _ms(lambda: dcgan.step(gstate, gstate.worker.sampler.next()),
                  **{**timing, "warmup": max(timing["warmup"], 4)})
        graphed = mode == "on"
        if graphed and gstate.graphed.graph is None:
            rows.append(("DCGAN D+G step, CUDA graph", "n/a", gstate.graphed.failed))
            continue
        rows.append(("DCGAN D+G step, CUDA graph" if graphed else "DCGAN D+G step (paper preset)", f"{gan:.2f}",
                     f"batch {gcfg.batch_size}; 50,000 steps: {gan * 50:.0f} s"))
    if device.type != "cuda":
        rows.append(("DCGAN D+G step, CUDA graph", "n/a", "needs CUDA"))
    return rows
