"""Benchmarks: each prints its numbers next to a plain-PyTorch/torchvision baseline run in the same process."""
