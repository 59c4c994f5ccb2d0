"""Plain single-process PyTorch loop vs the Ray Train path (1 worker), same model, batch and augmentation.

Both report training throughput over the same steps, the first 10 excluded on both
sides; Ray's start-up and tear-down are reported separately, not in the ratio. Plain
loops run before and after the Ray run and each figure is their mean, since on a small
shared machine throughput drifts by ~10 % between minutes.

The plain loop is the one a user writes: fp32. The Ray side runs the toolkit's
defaults, which include --precision auto (bf16 autocast where the hardware computes
bf16 natively). When that resolves to bf16, a control runs the plain loop in bf16
too, so the output separates what the precision gains from what Ray itself costs.
The plain loop also serves the tests as the reference a Ray run must learn as well as.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cifarray.data.augment import DeviceAugment
from cifarray.data.loader import ShardedBatches
from cifarray.data.source import DataSource
from cifarray.data.synth import write_synthetic
from cifarray.errors import UserError
from cifarray.eval.classifier import evaluate
from cifarray.device import autocast, channels_last
from cifarray.train.config import DenseNetTrainConfig
from cifarray.train.densenet import build_model, make_optimizer


WARMUP = 10  # steps excluded from throughput on both sides (allocator and thread-pool warm-up)


def plain_train(cfg: DenseNetTrainConfig, data_dir: Path, warmup: int = WARMUP, precision: str = "fp32") -> dict:
    """Train like the DenseNet family with a plain loop in this process; returns img/s and accuracies.

    Model (and memory format), optimizer, schedule and augmentation come from the family's own
    builders and config, so the two sides differ only by Ray and the engine.

    `precision` is the loop's own (fp32 or bf16), not cfg.precision: the reference is fp32 unless asked.
    """
    torch.set_num_threads(cfg.cpus_per_worker or torch.get_num_threads())
    device = torch.device("cuda" if cfg.gpu else "cpu")
    data = DataSource(Path(data_dir), None, False, cfg.val_size, cfg.seed).prepare(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    opt, sched = make_optimizer(cfg, model)
    sampler = ShardedBatches(len(data.train), cfg.batch_size, seed=cfg.seed, device=device)
    aug = DeviceAugment(cfg.augment_config(), data.mean, data.std, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model.train()
    t0 = None
    for step in range(cfg.steps):
        if step == warmup:
            t0 = time.perf_counter()
        idx = sampler.next()
        x = channels_last(aug(data.train.images[idx], gen))
        with autocast(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), data.train.labels[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0 if t0 is not None else float("nan")
    return {"images_per_s": (cfg.steps - warmup) * cfg.batch_size / seconds,
            "test_acc": evaluate(model, data.test, aug, device)[0],
            "val_acc": evaluate(model, data.val, aug, device)[0]}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="plain PyTorch loop vs Ray Train (1 worker)", description=__doc__)
    p.add_argument("--steps", type=int, default=300,
                   help="steps per side (a multiple of 10; under ~200, the Ray side still includes the "
                        "controller's start-up activity in its first windows)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--growth-rate", type=int, default=4, help="small default: the paper model takes ~3 s/step on 2 CPU cores")
    p.add_argument("--blocks", default="2,2,2")
    p.add_argument("--augment", default="basic")
    p.add_argument("--precision", default="auto", help="the Ray side's --precision (auto | bf16 | fp32)")
    p.add_argument("--gpu", action="store_true")
    p.set_defaults(func=run)


def _mean(pair: list[float]) -> float:
    return sum(pair) / len(pair)


def run(args: argparse.Namespace) -> int:
    from cifarray.train import launch
    from cifarray.rundir import RunDir, read_metrics
    from cifarray.device import resolve_precision
    from cifarray.train.densenet import FAMILY

    if args.steps < 2 * WARMUP or args.steps % WARMUP:
        raise UserError(f"--steps {args.steps} must be a multiple of {WARMUP} and at least {2 * WARMUP}")
    tmp = Path(tempfile.mkdtemp(prefix="cifarray-bench-"))
    try:
        cfg = DenseNetTrainConfig(
            synthetic=True, synthetic_train_per_class=60, synthetic_test_per_class=10, out=str(tmp / "ray-run"),
            steps=args.steps, batch_size=args.batch_size, growth_rate=args.growth_rate,
            blocks=tuple(int(b) for b in args.blocks.split(",")), augment=args.augment, gpu=args.gpu,
            precision=args.precision, val_size=1000, log_every=WARMUP, eval_every=10**9, checkpoint_every=10**9,
            max_failures=0)
        write_synthetic(tmp / "data", train_per_class=60, test_per_class=10, difficulty=cfg.synthetic_difficulty)
        (tmp / "ray-run").mkdir()
        shutil.copytree(tmp / "data", tmp / "ray-run" / "data")
        # The Ray worker resolves `auto` on its own device; this process has the same one (a local cluster).
        precision = resolve_precision(args.precision, torch.device("cuda" if args.gpu else "cpu"))
        sides = ["fp32"] + (["bf16"] if precision == "bf16" else [])
        plain: dict[str, list[float]] = {p: [] for p in sides}
        for p in sides:
            plain[p].append(plain_train(cfg, tmp / "data", precision=p)["images_per_s"])
        t = time.perf_counter()
        launch.fit(cfg, FAMILY, what="ray train")
        wall = time.perf_counter() - t
        run_dir = RunDir(cfg.out)
        seconds = [float(r["seconds"]) for r in read_metrics(run_dir.metrics)]
        steady = seconds[1:]  # the first window holds start-up steps
        ray_rate = len(steady) * WARMUP * cfg.batch_size / sum(steady)
        trained = sum(seconds)
        done = run_dir.read_summary()  # on one GPU, --cuda-graphs auto: the ratio then holds the graphs' gain too
        ray_precision, ray_graphed = done["precision"], bool(done.get("cuda_graphs"))
        import ray

        ray.shutdown()  # the idle local cluster would otherwise take ~12 % of a core from the runs after
        for p in reversed(sides):
            plain[p].append(plain_train(cfg, tmp / "data", precision=p)["images_per_s"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ray_precision != precision:
        raise RuntimeError(f"the Ray worker trained in {ray_precision}, this process resolved {precision}")
    fp32 = _mean(plain["fp32"])
    print(f"train densenet k={cfg.growth_rate} blocks={args.blocks} batch={cfg.batch_size} steps={cfg.steps} "
          f"augment={cfg.augment} device={'cuda' if cfg.gpu else 'cpu'} torch={torch.__version__}")
    print(f"  plain PyTorch loop, fp32     : {fp32:9.0f} img/s  (before {plain['fp32'][0]:.0f}, "
          f"after {plain['fp32'][1]:.0f})")
    print(f"  Ray Train, 1 worker, {ray_precision:<7} : {ray_rate:9.0f} img/s  (--precision {args.precision}"
          f"{', CUDA graphs on' if ray_graphed else ''})")
    print(f"  ratio (ray / plain)          : {ray_rate / fp32:.2f}")
    if precision == "bf16":
        same = _mean(plain["bf16"])
        print(f"  control: plain loop, bf16    : {same:9.0f} img/s  (before {plain['bf16'][0]:.0f}, "
              f"after {plain['bf16'][1]:.0f})")
        print(f"  ratio at equal precision     : {ray_rate / same:.2f}  (Ray's own cost; bf16 gain "
              f"{same / fp32:.2f}x)")
    print(f"  Ray start-up + tear-down     : {wall - trained:.1f} s (not in the ratio)")
    return 0
