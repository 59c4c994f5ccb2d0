"""CIFAR-100 data: safe loading, validation, procedural data, device-side augmentation."""

from cifarray.data.cifar import Cifar100, Split, load_cifar100, validation_split

__all__ = ["Cifar100", "Split", "load_cifar100", "validation_split"]
