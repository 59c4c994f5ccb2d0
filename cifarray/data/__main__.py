"""python -m cifarray.data {synth,check,download}: make, inspect and fetch CIFAR-100 data."""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import numpy as np

from cifarray.data import cifar
from cifarray.data.synth import DIFFICULTIES
from cifarray.errors import run_cli


def _synth(args: argparse.Namespace) -> int:
    from cifarray.data.synth import write_synthetic

    t = time.perf_counter()
    folder = write_synthetic(args.out_dir, train_per_class=args.train_per_class,
                             test_per_class=args.test_per_class, seed=args.seed, difficulty=args.difficulty,
                             force=args.force)
    print(f"procedural CIFAR-100 ({args.difficulty}): {folder} ({100 * args.train_per_class} train, "
          f"{100 * args.test_per_class} test images, seed {args.seed}) in {time.perf_counter() - t:.1f}s")
    print(f"check it with: python -m cifarray.data check {args.out_dir} --no-verify")
    return 0


def _check(args: argparse.Namespace) -> int:
    data = cifar.load_cifar100(args.data_dir, verify=not args.no_verify)
    print(f"source:     {data.source}{'  (procedural, from cifarray.data synth)' if data.synthetic else ''}")
    if data.verified:
        print("checksums:  md5 of train, test and meta match the official CIFAR-100 release")
    else:
        print("checksums:  not checked (--no-verify); structure validated")
    for name, split in (("train", data.train), ("test", data.test)):
        counts = np.bincount(split.fine_labels, minlength=cifar.NUM_FINE)
        print(f"{name + ':':11s} {len(split):6d} images {split.images.shape[1:]} uint8, "
              f"{int((counts > 0).sum())} fine classes ({counts.min()}-{counts.max()} per class), "
              f"{len(np.unique(split.coarse_labels))} coarse")
    print(f"classes:    {len(data.fine_names)} fine ({', '.join(data.fine_names[:4])}, ...), "
          f"{len(data.coarse_names)} coarse")
    return 0


def _download(args: argparse.Namespace) -> int:
    path = cifar.download(args.root)
    print(f"downloaded and verified {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifarray.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a learnable procedural 100-class data set in the real on-disk format")
    p.add_argument("out_dir", help="folder to create cifar-100-python/ in")
    p.add_argument("--train-per-class", type=int, default=500, help="training images per class (real: 500)")
    p.add_argument("--test-per-class", type=int, default=100, help="test images per class (real: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", choices=DIFFICULTIES, default="hard",
                   help="hard (default): 20 groups of 5 look-alike classes with clutter, occlusion and noise, "
                        "for learning tests and benchmarks; easy: 10 patterns x 10 hues, ~100 %% quickly, for "
                        "loader tests")
    p.add_argument("--force", action="store_true", help="replace procedural data made with other parameters")
    p.set_defaults(func=_synth)

    p = sub.add_parser("check", help="validate a CIFAR-100 folder or tarball and print what it holds")
    p.add_argument("data_dir", help="folder holding cifar-100-python/ or the .tar.gz, or either itself")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the md5 check against the official files (structure is still validated)")
    p.set_defaults(func=_check)

    p = sub.add_parser("download", help="download the official tarball (needs internet) and verify its md5")
    p.add_argument("root", help="folder to put cifar-100-python.tar.gz in")
    p.set_defaults(func=_download)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run_cli(main)
