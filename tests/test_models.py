"""Models: exact parameter counts without building, presets, budgets."""

from __future__ import annotations

import random

import pytest
import torch

from cifarray.errors import BudgetError, UserError
from cifarray.models import dcgan, densenet
from cifarray.models.budget import CLASSIFIER_BUDGET, GAN_BUDGET, enforce_budget
from cifarray.models.densenet import trainable_params


def random_densenet(rng: random.Random) -> densenet.DenseNetConfig:
    return densenet.DenseNetConfig(
        growth_rate=rng.randint(1, 24),
        blocks=tuple(rng.randint(1, 8) for _ in range(rng.randint(1, 6))),
        init_channels=rng.choice([None, rng.randint(1, 64)]),
        bottleneck=rng.random() < 0.5,
        compression=rng.choice([1.0, 0.5, rng.uniform(0.05, 1.0)]),
        dropout=rng.choice([0.0, 0.2]),
        num_classes=rng.choice([100, 10, 7]),
    )


def test_densenet_param_count_is_exact_for_random_configs():
    rng = random.Random(0)
    for _ in range(250):
        cfg = random_densenet(rng)
        assert densenet.param_count(cfg) == trainable_params(densenet.DenseNet(cfg)), cfg


def test_dcgan_param_counts_are_exact_for_random_configs():
    rng = random.Random(1)
    for _ in range(60):
        cfg = dcgan.DCGANConfig(
            z_dim=rng.randint(1, 160),
            g_widths=tuple(rng.randint(1, 96) for _ in range(4)),
            d_widths=tuple(rng.randint(1, 96) for _ in range(4)),
            d_batchnorm=rng.random() < 0.5,
            spectral_norm=rng.random() < 0.5,
        )
        assert dcgan.generator_params(cfg) == trainable_params(dcgan.Generator(cfg)), cfg
        assert dcgan.discriminator_params(cfg) == trainable_params(dcgan.Discriminator(cfg)), cfg


def test_param_count_is_cheap_enough_for_a_search(monkeypatch):
    """A search counts thousands of configs: param_count is arithmetic, building no module and no tensor (what a
    wall-clock bound on a shared machine would only suggest)."""
    rng = random.Random(2)
    configs = [random_densenet(rng) for _ in range(500)]
    expected = [densenet.param_count(cfg) for cfg in configs[:20]]

    def refused(*args, **kwargs):
        raise AssertionError("param_count built a module or a tensor")

    monkeypatch.setattr(torch.nn.Module, "__init__", refused)
    for name in ("empty", "zeros", "ones", "randn", "rand", "tensor"):
        monkeypatch.setattr(torch, name, refused)
    counts = [densenet.param_count(cfg) for cfg in configs]
    assert counts[:20] == expected and all(isinstance(c, int) and c > 0 for c in counts)


def test_paper_presets():
    cfg = densenet.PRESETS["paper"]
    assert cfg.growth_rate == 8 and cfg.blocks == (5, 5, 5, 5)
    assert densenet.param_count(cfg) == 99_735 <= CLASSIFIER_BUDGET
    gan = dcgan.PRESETS["paper"]
    assert gan.z_dim == 128 and abs(dcgan.param_count(gan) - 595_840) / 595_840 < 0.03


def test_forward_shapes():
    x = torch.randn(2, 3, 32, 32)
    for blocks in [(1,), (2, 2, 2, 2, 2, 2), (5, 5, 5, 5)]:
        assert densenet.DenseNet(densenet.DenseNetConfig(blocks=blocks))(x).shape == (2, 100)
    cfg = dcgan.PRESETS["paper"]
    fake = dcgan.Generator(cfg)(torch.randn(2, 128))
    assert fake.shape == (2, 3, 32, 32) and fake.abs().max() <= 1
    assert dcgan.Discriminator(cfg)(fake).shape == (2,)


def test_budget_is_enforced_with_count_and_budget():
    big = densenet.DenseNetConfig(growth_rate=12, blocks=(6, 6, 6))
    count = densenet.param_count(big)
    assert count > CLASSIFIER_BUDGET
    with pytest.raises(BudgetError, match=f"{count:,} trainable parameters, over the budget of 100,000"):
        enforce_budget(big)
    assert enforce_budget(big, budget=count) == count
    wide = dcgan.DCGANConfig(g_widths=(256, 128, 64, 32))
    with pytest.raises(BudgetError, match="over the budget of 1,000,000"):
        enforce_budget(wide)
    assert enforce_budget(dcgan.PRESETS["paper"]) <= GAN_BUDGET


def test_config_validation():
    with pytest.raises(UserError, match="blocks must be 1..6"):
        densenet.DenseNetConfig(blocks=(1,) * 7)
    with pytest.raises(UserError, match="compression"):
        densenet.DenseNetConfig(compression=0)
    with pytest.raises(UserError, match="g_widths must be 4"):
        dcgan.DCGANConfig(g_widths=(8, 8))
    with pytest.raises(UserError, match="unknown DenseNet preset"):
        densenet.preset("huge")
