"""Device-side batched augmentation versus torchvision v2 per image, on the same images.

Both sides run on one CPU thread (torchvision's per-image pipeline is what a
DataLoader worker runs; one thread each makes the comparison per core). The two
sides' repeats are interleaved, so both see the same machine conditions, and the
median over repeats is reported: one noisy moment on a shared machine does not
decide the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from cifarray.data.augment import MODES, AugmentConfig, DeviceAugment, reference_pipeline
from cifarray.data.synth import make_class
from cifarray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("augment", help="batched device augmentation vs torchvision v2 per image",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=512, help="images per batched call (the paper's batch)")
    p.add_argument("--batches", type=int, default=16, help="batched calls per timed repeat")
    p.add_argument("--reference-images", type=int, default=512, help="images per torchvision repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side; the median is reported")
    p.add_argument("--mode", choices=MODES, default="augmix", help="pipeline to compare (default crop+flip+AugMix)")
    p.add_argument("--device", default="cpu", help="device of the batched pipeline (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _images(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    per = max(1, -(-n // 100))
    return torch.from_numpy(np.concatenate([make_class(c, per, rng) for c in range(100)])[:n])


def _rate(fn, images: int) -> float:
    t = time.perf_counter()
    fn()
    return images / (time.perf_counter() - t)


def run(args: argparse.Namespace) -> int:
    if min(args.batch_size, args.batches, args.reference_images, args.repeats) < 1:
        raise UserError("--batch-size, --batches, --reference-images and --repeats must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda given but no CUDA device is visible; use --device cpu")
    torch.set_num_threads(1)
    cfg = AugmentConfig(mode=args.mode)
    images = _images(args.batch_size * args.batches, args.seed)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    batched = DeviceAugment(cfg, mean, std, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    on_device = images.to(device)
    batches = on_device.split(args.batch_size)

    def run_batched() -> None:
        for b in batches:
            batched(b, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()

    reference = reference_pipeline(cfg, mean, std)
    ref_images = list(images[: args.reference_images])
    torch.manual_seed(args.seed)

    def run_reference() -> None:
        for im in ref_images:
            reference(im)

    run_batched(), run_reference()  # warm-up: first-call allocations are not throughput
    fast_rates, slow_rates = [], []
    for _ in range(args.repeats):
        fast_rates.append(_rate(run_batched, len(images)))
        slow_rates.append(_rate(run_reference, len(ref_images)))
    fast, slow = statistics.median(fast_rates), statistics.median(slow_rates)
    ratio = statistics.median(f / s for f, s in zip(fast_rates, slow_rates))
    print(f"augment mode={args.mode} batch={args.batch_size} torch={torch.__version__} threads=1 "
          f"repeats={args.repeats} (median)")
    print(f"  cifarray batched on {device.type:4s}: {fast:10.0f} img/s  ({len(images)} images per repeat)")
    print(f"  torchvision v2 per image (cpu) : {slow:10.0f} img/s  ({len(ref_images)} images per repeat)")
    print(f"  ratio: {ratio:.1f}x  (median of per-repeat ratios; range "
          f"{min(f / s for f, s in zip(fast_rates, slow_rates)):.1f}-{max(f / s for f, s in zip(fast_rates, slow_rates)):.1f})")
    return 0
