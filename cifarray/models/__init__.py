"""Models (no training code): DenseNet classifier, DCGAN, and their parameter budgets."""

from cifarray.models.dcgan import DCGANConfig, Discriminator, Generator
from cifarray.models.densenet import DenseNet, DenseNetConfig

__all__ = ["DCGANConfig", "DenseNet", "DenseNetConfig", "Discriminator", "Generator"]
