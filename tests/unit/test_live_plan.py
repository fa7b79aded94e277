"""plan_of: a store version compiled for the configured layers (one-layer versions at the split layer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fire_backend.fire import Direction
from fire_backend.repository.layout import ServingSettings
from fire_backend.stores.files import DirectionStore
from fire_backend.stores.format import DirectionSet, LayeredSet
from fire_backend.stub.live_plan import plan_of

SHAPES = {"block1": (2, 2), "block2": (3,)}


def settings() -> ServingSettings:
    return ServingSettings(layer="block2", input_shape=(1, 8, 8), latent_shape=(3,), num_classes=10,
                           arch="digits_cnn", layout="fused", repair_layers=("block1", "block2"), layer_shapes=SHAPES)


def one(dim: int, directions: int = 1) -> DirectionSet:
    return DirectionSet(np.zeros(dim, np.float32), [Direction(torch.ones(dim)) for _ in range(directions)])


@pytest.fixture
def store(tmp_path: Path) -> DirectionStore:
    store = DirectionStore(tmp_path).ensure()
    store.initialize()
    return store


def test_every_layer_with_a_direction_is_planned_and_one_without_is_left_out(store) -> None:
    store.commit(LayeredSet({"block1": one(4, 2), "block2": one(3, 0)}), "observe")
    plan = plan_of(store.read_version(1), settings(), torch.device("cpu"))
    assert plan.layers == ("block1",) and plan.version == 1 and plan.repairs["block1"].units.shape == (2, 4)


def test_a_one_layer_version_applies_at_the_split_layer_and_version_0_repairs_nothing(store) -> None:
    store.commit(one(3), "push")
    plan = plan_of(store.read_version(1), settings(), torch.device("cpu"))
    assert plan.layers == ("block2",)
    assert plan_of(None, settings(), torch.device("cpu")).layers == ()


def test_a_layer_the_repository_does_not_repair_is_refused(store) -> None:
    store.commit(LayeredSet({"block3": one(5)}), "push")
    with pytest.raises(ValueError, match="no repairable latent at layer 'block3'"):
        plan_of(store.read_version(1), settings(), torch.device("cpu"))
