"""Benchmark commands run and report; their numbers are recorded in docs/BENCHMARKS.md, not asserted."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import run_cli_here, run_module

import cifarray.bench.train as bench_train
from cifarray.data.augment import DeviceAugment
from cifarray.data.synth import write_synthetic
from cifarray.train.config import DenseNetTrainConfig


def test_bench_augment_reports_both_sides_and_ratio():
    result = run_module("cifarray.bench", "augment", "--batch-size", "64", "--batches", "2",
                        "--reference-images", "16", "--repeats", "2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"cifarray batched on cpu\s*:\s*\d+ img/s", result.stdout)
    assert re.search(r"torchvision v2 per image \(cpu\)\s*:\s*\d+ img/s", result.stdout)
    assert re.search(r"ratio: \d+\.\dx", result.stdout)


def test_bench_bad_input_is_one_line_error():
    result = run_cli_here("cifarray.bench", "augment", "--batch-size", "0")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_train_reports_plain_ray_and_ratio():
    result = run_module("cifarray.bench", "train", "--steps", "30", "--batch-size", "32", "--blocks", "1,1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    plain = float(re.search(r"plain PyTorch loop, fp32\s*:\s*(\d+) img/s", out).group(1))
    ray = re.search(r"Ray Train, 1 worker, (bf16|fp32)\s*:\s*(\d+) img/s", out)
    ratio = float(re.search(r"ratio \(ray / plain\)\s*:\s*(\d+\.\d+)", out).group(1))
    # The ratio is of the measured rates, which are printed rounded to whole img/s (and it to 2 decimals):
    # at the few dozen img/s of a loaded 2-core machine that rounding alone moves it by up to ~0.03.
    rate = float(ray.group(2))
    assert plain > 0.5 and (rate - 0.5) / (plain + 0.5) - 0.005 <= ratio <= (rate + 0.5) / (plain - 0.5) + 0.005, out
    # A bf16 Ray side comes with the equal-precision control; an fp32 one needs none.
    assert ("control: plain loop, bf16" in out) == (ray.group(1) == "bf16")
    assert re.search(r"Ray start-up \+ tear-down\s*:\s*\d+\.\d s", out)


def test_bench_train_bad_steps_is_one_line_error():
    result = run_cli_here("cifarray.bench", "train", "--steps", "15")
    assert result.returncode == 2 and result.stderr.strip() == "error: --steps 15 must be a multiple of 10 and at least 20"


def test_the_plain_baseline_augments_with_the_runs_own_augmix_settings(monkeypatch, tmp_path):
    # The baseline once built AugmentConfig(mode=...) alone and silently ran AugMix at default severity/width.
    seen = []

    class Spy(DeviceAugment):
        def __init__(self, config, *args, **kwargs):
            seen.append(config)
            super().__init__(config, *args, **kwargs)

    monkeypatch.setattr(bench_train, "DeviceAugment", Spy)
    write_synthetic(tmp_path, train_per_class=2, test_per_class=1)
    cfg = DenseNetTrainConfig(synthetic=True, steps=1, batch_size=8, val_size=10, augment="augmix",
                              augmix_severity=5, augmix_width=2, growth_rate=2, blocks=(1, 1), cpus_per_worker=1)
    bench_train.plain_train(cfg, tmp_path, warmup=0)
    assert [(c.mode, c.severity, c.width) for c in seen] == [("augmix", 5, 2)]


@pytest.mark.slow
def test_bench_gpu_prints_its_table_on_the_cpu_with_small_sizes():
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("cifarray-bench-gpu-*"))
    result = run_module("cifarray.bench", "gpu", "--device", "cpu", "--batch-size", "32", "--gan-batch-size", "16",
                        "--growth-rate", "4", "--blocks", "1,1", "--steps", "2", "--warmup", "1", "--repeats", "1",
                        "--compile", "--e2e-steps", "20", "--chunk", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^bench gpu: cpu .*precision (bf16|fp32), DenseNet k=4 blocks=1,1", out, re.M)
    for row in ("AugMix \\+ crop \\+ flip, one batch", "AugMix \\+ crop \\+ flip, bulk, per batch",
                "model step, eager", "model step, torch.compile",
                "full step \\(order \\+ augment \\+ model\\)", "DCGAN D\\+G step \\(paper preset\\)"):
        assert re.search(rf"^  {row}\s+\d+\.\d\d\s", out, re.M), row
    ops = int(re.search(r"aten operators per full step\s+(\d+)", out).group(1))
    assert ops > 50  # a DenseNet step is hundreds of operators; zero would mean the profiler saw nothing
    full = float(re.search(r"full step \(order \+ augment \+ model\)\s+(\d+\.\d+)", out).group(1))
    projected = float(re.search(r"projected 10,000 steps\s+(\d+) s", out).group(1))
    assert abs(projected - full * 10) <= 1
    e2e = re.search(r"end-to-end python -m cifarray.train\s+(\d+\.\d) s wall for 20 steps: worker start-up "
                    r"(\d+\.\d+) s, training (\d+\.\d+) s, finish (\d+\.\d+) s", out)
    assert e2e and float(e2e.group(1)) > float(e2e.group(3)) > 0, out
    assert "3 batches per call" in out
    assert re.search(r"^  full step, CUDA graph\s+n/a\s+needs CUDA$", out, re.M)  # said, not faked
    assert set(tmp.glob("cifarray-bench-gpu-*")) == before  # its run folders and data are removed
    # Progress on stderr, the table alone on stdout; kineto's "profiler_start" lines are kept out of both.
    assert "bench gpu: timing the full step (3 steps x 1) and profiling it" in result.stderr
    assert "timing" not in out and "profiler_start" not in result.stderr + out
    assert "the defaults on" not in result.stderr  # every size was given


def test_bench_gpu_sizes_default_to_the_paper_on_a_gpu_and_to_small_ones_on_the_cpu():
    from cifarray.bench import __main__ as bench, gpu

    args = bench.parser().parse_args(["gpu", "--batch-size", "96"])
    assert gpu.resolve_sizes(args, torch.device("cpu")) == ["gan_batch_size", "steps", "warmup", "chunk", "e2e_steps"]
    assert (args.batch_size, args.gan_batch_size, args.e2e_steps) == (96, 32, 20)  # given, then the CPU's
    args = bench.parser().parse_args(["gpu", "--steps", "7"])
    gpu.resolve_sizes(args, torch.device("cuda"))
    assert (args.batch_size, args.gan_batch_size, args.steps, args.chunk, args.e2e_steps) == (512, 128, 7, 0, 200)


def test_bench_gpu_without_cuda_is_one_line_error():
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli_here("cifarray.bench", "gpu", "--device", "cuda")
    assert result.returncode == 2 and result.stderr.strip() == "error: --device cuda: no CUDA device here; pass --device cpu"


@pytest.mark.slow
def test_bench_sweep_runs_the_same_sweep_with_each_runner_and_prints_overhead_and_ratio():
    # One trial per runner: a second one ran beside it (2 CPUs, 2 slots), so it showed no actor reused, and with the
    # train runner it cost one more TorchTrainer start (~20 s on 2 cores).
    result = run_module("cifarray.bench", "sweep", "--trials", "1", "--steps", "10")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^bench sweep: .+, \d+ cores; 1 one-worker trial x 10 steps .* precision (bf16|fp32)", out, re.M)
    table = {m.group(1): [float(v) for v in m.groups()[1:]] for m in re.finditer(
        r"^  (tune|train)\s+([\d.]+) s\s+([\d.]+) s\s+([\d.]+) s\s+([\d.]+) s\s+(\d+)", out, re.M)}
    assert set(table) == {"tune", "train"}, out
    for wall, train_s, median, worst, actors in table.values():
        assert wall > train_s > 0 and 0 <= median <= worst
    assert table["train"][4] == 1 and table["tune"][4] == 1  # the trial's driver actor; its in-actor trial's actor
    overhead = float(re.search(r"^in-actor overhead per trial: (\d+\.\d) s$", out, re.M).group(1))
    ratio = float(re.search(r"^ratio \(train / tune runner overhead\): (\d+\.\d\d)$", out, re.M).group(1))
    assert overhead == table["tune"][2]
    # Printed to one decimal: the ratio of the unrounded medians lies within what the rounding allows.
    lo, hi = (table["train"][2] - 0.05) / (overhead + 0.05), (table["train"][2] + 0.05) / max(overhead - 0.05, 1e-9)
    assert lo - 0.005 <= ratio <= hi + 0.005, out
    for runner in ("tune", "train"):
        outside = re.search(rf"^{runner}: slot-s per trial outside the trial function \((\d+) slots\): (-?\d+\.\d\d) "
                            r"for all 1$", out, re.M)
        assert outside and int(outside.group(1)) >= 1, out
        # What a resume needs stays in OUT/tune: Tune's experiment state, not the ended trials' checkpoints.
        stored = re.search(rf"^{runner}: OUT/tune after the sweep: ([\d.]+) MB \(experiment state ([\d.]+) MB, "
                           r"checkpoints ([\d.]+) MB, trial logs ([\d.]+) MB\)$", out, re.M)
        assert stored and stored.group(3) == "0.0", out


def test_slot_seconds_outside_the_trial_function_count_the_idle_slots_per_trial():
    from cifarray.bench.sweep import outside_slot_seconds

    # Two slots; a pair of 1 s trials, 0.5 s of bookkeeping, another pair, then 1.5 s before each of the last two.
    trials = [{"entered": e, "wall": 1.0} for e in (0.0, 0.0, 1.5, 1.5, 4.0, 5.0)]
    assert outside_slot_seconds(trials, 2, 0.0, 2 / 3) == pytest.approx((2 * 2.5 - 4) / 4)
    assert outside_slot_seconds(trials, 2, 2 / 3, 1.0) == pytest.approx((2 * (6.0 - 2.5) - 2) / 2)
    assert outside_slot_seconds(trials, 2) == pytest.approx((2 * 6.0 - 6) / 6)
    assert outside_slot_seconds(trials, 2, 0.5, 0.5) is None


def test_bench_sweep_bad_input_is_one_line_error():
    for args, text in ((["--runners", "tune,nope"], "--runners 'tune,nope'"), (["--steps", "3"], "--steps even")):
        result = run_cli_here("cifarray.bench", "sweep", *args)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and text in result.stderr, result.stderr


def test_bench_startup_phases_add_up_to_the_run_and_a_missing_mark_is_named():
    from cifarray.bench.startup import PHASES, phases_of

    names = [end for _, _, end in PHASES if end != "exit"]
    marks = [{"mark": name, "t": 100.0 + 2 * i, "pid": 1, **({"rank": 0} if i > 3 else {})}
             for i, name in enumerate(names)]
    marks.append({"mark": "set_up", "t": 500.0, "rank": 1})  # another rank's marks do not count
    phases = phases_of(marks, spawned=99.0, exited=120.0)
    assert list(phases) == [name for name, _, _ in PHASES]
    assert phases["interpreter and imports"] == 1.0 and phases["worker set-up (data, model)"] == 2.0
    assert sum(phases.values()) == pytest.approx(21.0)  # spawn to exit, every second in one phase
    with pytest.raises(RuntimeError, match="no first_step"):
        phases_of([m for m in marks if m["mark"] != "first_step"], 99.0, 120.0)
    # The local runner starts no Ray: its "Ray up" is None and the next phase starts at the input checks' end.
    local = phases_of([m for m in marks if m["mark"] != "ray_up"], 99.0, 120.0)
    assert local["Ray up"] is None and local["trainer or controller up"] == phases["Ray up"] + phases[
        "trainer or controller up"]
    assert sum(v for v in local.values() if v is not None) == pytest.approx(21.0)


def test_bench_startup_gpu_rows_come_from_the_gpu_marks():
    from cifarray.bench.startup import gpu_rows

    assert set(gpu_rows([{"mark": "set_up", "t": 1.0}]).values()) == {"needs CUDA"}
    marks = [{"mark": "cuda_init", "t": 10.0, "rank": 0}, {"mark": "cuda_ready", "t": 12.5, "rank": 0},
             {"mark": "graph_capture", "t": 20.0}, {"mark": "graph_captured", "t": 20.25}]
    assert gpu_rows(marks) == {"CUDA initialisation": "2.50", "cuDNN autotuning": "not used",
                               "CUDA-graph capture": "0.25", "FID Inception features": "not in this run"}


@pytest.mark.slow
def test_bench_startup_times_each_phase_of_a_real_run():
    result = run_module("cifarray.bench", "startup", "--ways", "default", "--steps", "2", "--small")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^bench startup: .+, \d+ cores; a 2-step .* precision (bf16|fp32)", out, re.M), out
    rows = dict(re.findall(r"^  (\S.*?)\s{2,}(\d+\.\d\d|needs CUDA|no Ray)$", out, re.M))
    from cifarray.bench.startup import GPU_ONLY, PHASES

    assert rows.pop("Ray up") == "no Ray"  # the default runner for one worker on one machine: this process
    times = {name: float(rows[name]) for name, _, _ in PHASES if name != "Ray up"}
    assert all(t >= 0 for t in times.values()) and times["training"] > 0
    assert sum(times.values()) == pytest.approx(float(rows["total (process start to exit)"]), abs=0.05)
    if not torch.cuda.is_available():
        assert all(rows[name] == "needs CUDA" for name, _, _ in GPU_ONLY)
    assert re.search(r"^default: \d+\.\d s besides training \(\d+% of the run; runner local\)$", out, re.M), out


def test_bench_startup_bad_input_is_one_line_error():
    for args, text in ((["--ways", "default,nope"], "--ways 'default,nope'"), (["--steps", "0"], "--steps must be")):
        result = run_cli_here("cifarray.bench", "startup", *args)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {text}"), result.stderr
        assert "Traceback" not in result.stderr
    if torch.cuda.device_count() < 2:  # --gpu: one GPU per worker, counted before any run starts
        result = run_cli_here("cifarray.bench", "startup", "--gpu")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: --gpu with --ways default,ray,ddp needs 2 GPU(s), this machine has "
                                        f"{torch.cuda.device_count()}"), result.stderr
