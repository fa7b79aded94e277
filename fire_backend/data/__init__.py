"""Data sets (bundled digits, CIFAR-10 and .npz from a local path) and backdoor attacks."""

from fire_backend.data.attacks import ATTACKS, Attack, resolve_attack
from fire_backend.data.datasets import Dataset, load_dataset, to_tensor, to_uint8

__all__ = ["ATTACKS", "Attack", "Dataset", "load_dataset", "resolve_attack", "to_tensor", "to_uint8"]
