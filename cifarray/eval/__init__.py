"""Evaluation: FID (and IS, KID) through torch-fidelity against the local CIFAR-100 splits."""
