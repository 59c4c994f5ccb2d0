"""Cluster plumbing: Slurm, submitit, per-job Ray clusters. Knows nothing about models or data."""
