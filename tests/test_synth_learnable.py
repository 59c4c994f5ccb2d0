"""The procedural data set is learnable, and only through a correct loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cifarray.data.cifar import load_cifar100
from cifarray.data.synth import write_synthetic


def small_cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 96),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 100))


def to_input(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).float() - 128) / 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    write_synthetic(root, train_per_class=40, test_per_class=10, seed=2)
    data = load_cifar100(root, verify=False)
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = to_input(data.train.images), torch.from_numpy(data.train.fine_labels)
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        idx = torch.randint(len(y), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, data


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
