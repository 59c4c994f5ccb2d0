"""Training: the engine (one per-worker loop for every family), the DenseNet and DCGAN families, their
configs, and the driver that runs them on Ray Train."""
