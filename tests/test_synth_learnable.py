"""The procedural data set is learnable, and only through a correct loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cifarray.data.augment import AugmentConfig, DeviceAugment
from cifarray.data.cifar import load_cifar100
from cifarray.data.synth import write_synthetic


def small_cnn(widths: tuple[int, int, int] = (16, 32, 48)) -> nn.Module:
    # 16-32-48 channels: a third of the time of 32-64-96 (200 steps on `easy`, one thread: 15.6 s against 40.3 s)
    # with the same verdicts (docs/BENCHMARKS.md, "Issue 35, fourth part"); docs/experiments ran 32-64-96.
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    a, b, c = widths
    return nn.Sequential(*block(3, a), nn.MaxPool2d(2), *block(a, b), nn.MaxPool2d(2), *block(b, c),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 100))


def to_input(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).float() - 128) / 64


MEAN, STD = (128 / 255,) * 3, (64 / 255,) * 3  # DeviceAugment then normalises as to_input does


def train_small_cnn(data, steps: int, augment: str | None = None) -> nn.Module:
    """Adam on a fixed random-batch order; `augment` ("basic", "augmix") runs the project's DeviceAugment."""
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, y = torch.from_numpy(np.ascontiguousarray(data.train.images)), torch.from_numpy(data.train.fine_labels)
    aug = DeviceAugment(AugmentConfig(mode=augment), MEAN, STD) if augment else None
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(len(y), (128,), generator=g)
        xb = aug(images[idx], g) if aug else to_input(images[idx].numpy())
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    write_synthetic(root, train_per_class=40, test_per_class=10, seed=2)
    data = load_cifar100(root, verify=False)
    return train_small_cnn(data, 200), data


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(to_input(np.ascontiguousarray(images))).argmax(1).numpy()
    return float((pred == labels).mean())


@pytest.mark.slow
def test_small_cnn_learns_it(trained):
    model, data = trained
    assert accuracy(model, data.test.images, data.test.fine_labels) > 0.7  # chance is 0.01


@pytest.mark.slow
def test_loader_bugs_score_badly(trained):
    model, data = trained
    imgs, fine = data.test.images, data.test.fine_labels
    rows = imgs.reshape(len(imgs), 3072)
    bugs = {
        "R and B planes swapped": imgs[:, ::-1],
        "rows read as interleaved RGB": rows.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2),
    }
    good = accuracy(model, imgs, fine)
    for name, wrong in bugs.items():
        assert accuracy(model, wrong, fine) < good / 3, name
    assert accuracy(model, imgs, data.test.coarse_labels) < 0.1  # coarse labels taken for fine ones


@pytest.fixture(scope="module")
def trained_hard(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    write_synthetic(root, train_per_class=60, test_per_class=20, seed=2, difficulty="hard")
    data = load_cifar100(root, verify=False)
    return train_small_cnn(data, 400, augment="basic"), data


@pytest.mark.slow
def test_hard_set_is_learnable_without_saturating_and_confuses_within_groups(trained_hard):
    """The same CNN that reaches > 70 % on `easy` in 200 steps stays far from 100 % on `hard`, yet
    learns it well above chance, and its mistakes fall within the 5-class groups (coarse labels) far
    more often than chance (4 of the 99 wrong classes).

    Trained through the project's DeviceAugment (basic), so a colour bug there fails here. Measured
    (generator v3, data seed 2, model seed 0, EPYC VM, fp32, 16-32-48 channels): accuracy 0.157, within-group
    share of the errors 0.282, flipped test set 0.159; with R and B swapped in the augmentation's output:
    accuracy 0.0010 (the warm groups are learnt as cool ones). (32-64-96 channels: 0.179, 0.295, 0.1775 and
    0.0025.) Disabling the crop or playing the learning-rate schedule backwards does not move this model,
    see docs/BENCHMARKS.md.
    """
    model, data = trained_hard
    imgs, fine, coarse = data.test.images, data.test.fine_labels, data.test.coarse_labels
    acc = accuracy(model, imgs, fine)
    assert 0.10 < acc < 0.5, acc
    with torch.no_grad():
        pred = model(to_input(imgs)).argmax(1).numpy()
    wrong = pred != fine
    within = float((pred[wrong] // 5 == coarse[wrong]).mean())
    assert within > 0.2, within  # chance: 4/99 = 0.04
    # Horizontal flips keep classes: a flipped test set scores as well (within sampling noise).
    assert abs(accuracy(model, imgs[..., ::-1], fine) - acc) < 0.05


def test_hard_set_is_deterministic_and_in_the_real_format(tmp_path):
    a = write_synthetic(tmp_path / "a", train_per_class=3, test_per_class=2, seed=5, difficulty="hard")
    b = write_synthetic(tmp_path / "b", train_per_class=3, test_per_class=2, seed=5, difficulty="hard")
    for name in ("train", "test", "meta"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    data = load_cifar100(tmp_path / "a", verify=False)
    assert data.train.images.shape == (300, 3, 32, 32) and len(set(data.coarse_names)) == 20
    assert (data.train.coarse_labels == data.train.fine_labels // 5).all()
    assert data.fine_names[0].startswith("polygon5") and data.coarse_names[0] == "polygon_warm"
    c = write_synthetic(tmp_path / "c", train_per_class=3, test_per_class=2, seed=6, difficulty="hard")
    assert (c / "train").read_bytes() != (a / "train").read_bytes()


def test_runs_share_one_generated_set_through_the_cache(tmp_path, monkeypatch):
    from cifarray.data import synth

    monkeypatch.setenv("CIFARRAY_CACHE", str(tmp_path / "cache"))
    made = []
    make_split = synth.make_split
    monkeypatch.setattr(synth, "make_split", lambda *a, **k: made.append(a[2]) or make_split(*a, **k))
    kw = dict(train_per_class=3, test_per_class=2, seed=5, difficulty="hard")
    a = synth.synthetic_for_run(tmp_path / "a", **kw)
    b = synth.synthetic_for_run(tmp_path / "b", **kw)
    assert made == ["training", "testing"]  # generated once, for both run folders
    ref = write_synthetic(tmp_path / "ref", **kw)
    for name in ("train", "test", "meta"):
        assert (a / name).read_bytes() == (b / name).read_bytes() == (ref / name).read_bytes()
    assert load_cifar100(tmp_path / "b", verify=False).train.images.shape == (300, 3, 32, 32)
    made.clear()
    synth.synthetic_for_run(tmp_path / "c", **{**kw, "seed": 6})  # other settings: another set
    assert made == ["training", "testing"]
    # A run folder's copy is its own: regenerating it leaves the cache and the other run alone.
    write_synthetic(tmp_path / "a", **{**kw, "seed": 7}, force=True)
    assert (b / "train").read_bytes() == (ref / "train").read_bytes()
    made.clear()
    e = synth.synthetic_for_run(tmp_path / "e", **kw)
    assert made == [] and (e / "train").read_bytes() == (ref / "train").read_bytes()
    # No writable cache: generated in the run folder, as before.
    monkeypatch.setenv("CIFARRAY_CACHE", "/proc/cifarray-cache")
    d = synth.synthetic_for_run(tmp_path / "d", **kw)
    assert made == ["training", "testing"] and (d / "train").read_bytes() == (ref / "train").read_bytes()
