"""cifarray: small DenseNet and DCGAN on CIFAR-100 as distributed HPC jobs on Ray."""

__version__ = "0.1.0"
