"""Data: the CIFAR-10 reader (CIFAR-10-C and continual streams come with the benchmark issue)."""

from .cifar10 import CLASSES, load_cifar10, to_tensor

__all__ = ["CLASSES", "load_cifar10", "to_tensor"]
