"""FID through the real torch-fidelity code path, with a local Inception weights file (random weights)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarray.errors import UserError
from cifarray.eval import fid


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """InceptionV3 in torch-fidelity's exact layout with random weights (the real ones cannot be downloaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    path = tmp_path_factory.mktemp("weights") / fe.URL_INCEPTION_V3.rsplit("/", 1)[1]
    saved = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    try:
        torch.manual_seed(0)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = saved
    # PyTorch's default conv init shrinks activations ~3x per layer: through Inception's depth every
    # image would map to the same (zero) features. He init keeps random features informative.
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARRAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no hub cache: only explicit weights


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the two tests that take FID against the same procedural test split (SPLIT): whichever runs
    second reads the split's Inception statistics from it instead of computing them again (100 images at 299 px,
    ~40 s on 2 cores). Computing and caching them is tested either way, by the first."""
    return tmp_path_factory.mktemp("shared-cache")


# The test split both of them take FID against: `--synthetic` (hard) with 20 training and 1 test image per class.
SPLIT = dict(train_per_class=20, test_per_class=1, difficulty="hard")


def images(seed: int, n: int = 16, shift: int = 0) -> np.ndarray:
    # 16 images: Inception at 299 px costs ~0.27 s per image on 2 cores, and FID's properties hold at any size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 3, 32, 32)) + shift
    return np.clip(base, 0, 255).astype(np.uint8)


class Exploding(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        raise AssertionError("reference images were read again: the cache was not used")


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero_different_sets_differ_and_the_reference_is_cached(
        inception_weights, monkeypatch):
    a = images(0)
    weights = fid.resolve_weights(inception_weights)
    same = fid.compute(torch.from_numpy(a), a, split="t", weights=weights)["fid"]
    assert abs(same) < 1e-2
    assert list((fid.cache_dir() / "fidelity").glob("cifarray-t-*")), "no reference statistics were cached"
    # From here on the reference images must not be touched at all: their statistics come from the cache.
    real = fid.UInt8Images
    monkeypatch.setattr(fid, "UInt8Images", lambda x: Exploding() if x is a else real(x))
    other = fid.compute(torch.from_numpy(images(1, shift=55)), a, split="t", weights=weights)["fid"]
    assert other > 1.0 and other > 100 * abs(same)
    again = fid.compute(torch.from_numpy(a), a, split="t", weights=weights)["fid"]  # the cache holds a's own statistics
    assert again == pytest.approx(same, abs=1e-6)


def test_offline_without_weights_is_a_clean_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match=r"not available offline .* put weights-inception-2015-12-05-6726825d\.pth in"):
        fid.resolve_weights(None)


def test_crafted_weights_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "weights.pth"
    bad.write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": Evil()}))
    with pytest.raises(UserError, match="not a plain PyTorch weights file"):
        fid.resolve_weights(bad)
    assert not marker.exists()
    with pytest.raises(UserError, match="no such file"):
        fid.resolve_weights(tmp_path / "missing.pth")


def fake_dcgan_run(root: Path) -> Path:
    """A run folder as `cifarray.train dcgan` leaves it (untrained generator: FID is still computable)."""
    from cifarray.config import to_dict
    from cifarray.data.synth import write_synthetic
    from cifarray.models.dcgan import Generator
    from cifarray.rundir import RunDir
    from cifarray.train.config import DCGANTrainConfig

    run = RunDir(root)
    run.path.mkdir(parents=True)
    cfg = DCGANTrainConfig(synthetic=True, synthetic_train_per_class=SPLIT["train_per_class"],
                           synthetic_test_per_class=SPLIT["test_per_class"], out=str(root))
    write_synthetic(run.data, **SPLIT)
    run.write_json("config.json", to_dict(cfg))
    run.write_json("summary.json", {"model": "dcgan", "status": "complete"})
    torch.save(Generator(cfg.model_config()).state_dict(), run.path / "generator.pt")
    return run.path


@pytest.mark.slow
def test_eval_fid_cli_stores_results_and_fails_cleanly_without_weights(tmp_path, inception_weights, shared_cache,
                                                                       monkeypatch):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, run_cli_here

    monkeypatch.setenv("CIFARRAY_CACHE", str(shared_cache))
    run = fake_dcgan_run(tmp_path / "gan")
    env = {**os.environ, "CIFARRAY_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "cifarray.eval", "fid", str(run), "--samples", "20",
                         "--inception-weights", str(inception_weights)], capture_output=True, text=True, cwd=REPO,
                        env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["fid"] > 0 and summary["fid_samples"] == 20 and summary["fid_reference"] == "test"
    assert summary["fid_reference_images"] == 100 and "FID" in ok.stdout
    bad = run_cli_here("cifarray.eval", "fid", str(run), "--samples", "50", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: Inception weights for FID are not available offline")
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_fid_during_gan_training_keeps_the_best_generator(tmp_path, inception_weights, shared_cache, monkeypatch):
    import csv
    import json
    import subprocess
    import sys

    from conftest import REPO

    monkeypatch.setenv("CIFARRAY_CACHE", str(shared_cache))
    out = tmp_path / "gan"
    result = subprocess.run(
        [sys.executable, "-m", "cifarray.train", "dcgan", "--synthetic", "--synthetic-train-per-class",
         str(SPLIT["train_per_class"]), "--synthetic-test-per-class", str(SPLIT["test_per_class"]), "--val-size",
         "200", "--steps", "100", "--batch-size", "32", "--eval-every", "50", "--checkpoint-every", "50",
         "--fid-samples", "20", "--inception-weights", str(inception_weights), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "metrics.csv") as fh:
        fids = {int(r["step"]): r["fid"] for r in csv.DictReader(fh) if r["fid"]}
    assert sorted(fids) == [50, 100] and all(float(v) > 0 for v in fids.values())
    summary = json.loads((out / "summary.json").read_text())
    best_step = min(fids, key=lambda s: float(fids[s]))
    assert summary["best_fid_step"] == best_step and summary["best_fid"] == pytest.approx(float(fids[best_step]), rel=1e-4)
    assert (out / "generator_best.pt").is_file() and "every 50 steps, 20 samples" in summary["fid_during_training"]
    # The family's one test evaluation of a finished run (a sweep's best trial, each confirmed run): FID against the
    # test split with the driver's weights, else the labelled stats_fd fallback.
    from cifarray.config import from_dict
    from cifarray.eval.fid import resolve_weights
    from cifarray.family import RunContext
    from cifarray.rundir import RunDir
    from cifarray.train.dcgan import FAMILY

    run = RunDir(out)
    cfg = from_dict(FAMILY.config, json.loads((out / "config.json").read_text()))
    weights = resolve_weights(inception_weights)
    with_weights = FAMILY.sweep.test_metrics(run, cfg, RunContext(fid_weights=(str(weights.path), weights.sha256)))
    assert set(with_weights) == {"test_fid"} and with_weights["test_fid"] > 0
    without = FAMILY.sweep.test_metrics(run, cfg, RunContext())
    assert without["test_stats_fd"] > 0 and without["test_fid"] is None and "NOT FID" in without["test_fid_note"]
