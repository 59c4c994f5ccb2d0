"""python -m cifarray.bench {augment,train,gpu,sweep,startup} [options]"""

from __future__ import annotations

import argparse
from typing import Sequence

from cifarray.errors import run_cli


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifarray.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from cifarray.bench import augment, gpu, startup, sweep, train

    augment.add_parser(sub)
    train.add_parser(sub)
    gpu.add_parser(sub)
    sweep.add_parser(sub)
    startup.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run_cli(main)
