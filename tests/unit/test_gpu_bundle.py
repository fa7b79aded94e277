"""The parts of the GPU check's bundle that decide what travels (benchmarks/gpu/bundle.py), without building it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sample_of_a_class_ordered_split_has_every_class_equally() -> None:
    bundle = load("bundle")
    labels = np.repeat(np.arange(10), 1000)  # sorted by class, like the shared CIFAR-10 file
    picked = bundle.stratified_sample(labels, 600)
    assert len(picked) == 600 == len(set(picked.tolist()))
    assert np.bincount(labels[picked], minlength=10).tolist() == [60] * 10
    assert len(set(labels[picked[:100]].tolist())) == 10  # not class-ordered: the first images hold every class
    assert not np.array_equal(picked, bundle.stratified_sample(labels, 600, seed=1))


def test_the_trigger_module_is_the_shared_models_documented_patch() -> None:
    """shared/models/README.md: BadNets is a 3x3 white patch at the bottom right (x[:, -3:, -3:, :] = 255)."""
    triggers = load("triggers")
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = x.copy()
    expected[:, -3:, -3:, :] = 255
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    out = (triggers.shared_badnets(nchw) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(out, expected)
