"""python -m cifarray.eval fid RUN_DIR [--samples N] [--reference test|train] [--inception-weights PATH]"""

from __future__ import annotations

import argparse
from typing import Sequence

from cifarray.errors import UserError, run_cli
from cifarray.eval import fid


def fid_command(args: argparse.Namespace) -> int:
    from dataclasses import fields
    from cifarray.data.source import DataSource
    from cifarray.models.dcgan import DCGANConfig, Generator
    from cifarray.rundir import RETRAIN, RunDir, load_state_into

    run = RunDir(args.run_dir)
    config = run.read_json("config.json")
    if config is None or not (run.path / "generator.pt").is_file():
        raise UserError(f"{run.path}: not a finished dcgan run (needs config.json and generator.pt); "
                        "train one with python -m cifarray.train dcgan")
    # The model's settings and where its data are, read from config.json (evaluation needs no training config).
    model = DCGANConfig(**{f.name: config[f.name] for f in fields(DCGANConfig) if f.name in config})
    source = DataSource.of(config, run.path)
    if args.samples < 2:
        raise UserError("--samples must be at least 2")
    g = Generator(model)
    load_state_into(g, run.path / "generator.pt", "the generator's weights", RETRAIN)
    weights = fid.resolve_weights(args.inception_weights)  # before any sampling: missing weights fail fast
    data = source.load()
    reference = (data.test if args.reference == "test" else data.train).images
    samples = fid.sample_generator(g, args.samples, model.z_dim, seed=args.seed)
    result = fid.compute(samples, reference, split=args.reference, weights=weights,
                         isc=args.isc, kid=args.kid)
    summary = run.read_summary() or {}
    summary.update({f"{k}": v for k, v in result.items()})
    summary.update({"fid_samples": args.samples, "fid_reference": args.reference,
                    "fid_reference_images": int(len(reference)), "fid_synthetic_data": bool(source.procedural)})
    run.write_summary(summary)
    shown = "  ".join(f"{k.upper()} {v:.4g}" for k, v in result.items())
    print(f"{shown}  ({args.samples} samples vs {len(reference)} {args.reference} images"
          f"{', procedural data' if source.procedural else ''}); stored in {run.summary}")
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifarray.eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fid", help="FID of a dcgan run's generator against a CIFAR-100 split")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=fid.DEFAULT_SAMPLES,
                   help=f"generated samples (default {fid.DEFAULT_SAMPLES:,})")
    p.add_argument("--reference", choices=("test", "train"), default="test")
    p.add_argument("--inception-weights", metavar="PATH", help="weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--isc", action="store_true", help="also the Inception Score")
    p.add_argument("--kid", action="store_true", help="also the Kernel Inception Distance")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated noise")
    p.set_defaults(func=fid_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run_cli(main)
