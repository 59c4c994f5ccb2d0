"""Ray Train DDP trainers for the DenseNet and the DCGAN."""
