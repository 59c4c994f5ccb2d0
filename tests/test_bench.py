"""Benchmark commands run and report; their numbers are recorded in docs/BENCHMARKS.md, not asserted."""

from __future__ import annotations

import re

from conftest import run_module


def test_bench_augment_reports_both_sides_and_ratio():
    result = run_module("cifarray.bench", "augment", "--batch-size", "64", "--batches", "2",
                        "--reference-images", "16", "--repeats", "2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"cifarray batched on cpu\s*:\s*\d+ img/s", result.stdout)
    assert re.search(r"torchvision v2 per image \(cpu\)\s*:\s*\d+ img/s", result.stdout)
    assert re.search(r"ratio: \d+\.\dx", result.stdout)


def test_bench_bad_input_is_one_line_error():
    result = run_module("cifarray.bench", "augment", "--batch-size", "0")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
