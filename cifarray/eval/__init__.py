"""Evaluation: classifier accuracy and finished-run loading (classifier.py); FID (and IS, KID) through
torch-fidelity against the local CIFAR-100 splits (fid.py)."""
