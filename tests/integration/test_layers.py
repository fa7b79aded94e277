"""Several layers on the real tritonserver: the default configuration (no layer, no attack named) learns every
configured layer online from the same flagged images, chooses the layers without labels, and push, status and
rollback work across layers under one version number."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import infer, labels
from test_control import flagged_images

from fire_backend.stores.files import DirectionStore
from fire_backend.wire.control import ControlClient
from fire_backend.wire.errors import FireClientError

pytestmark = pytest.mark.integration


@pytest.fixture
def ctl(layered):
    with ControlClient(layered.grpc, layered.token) as client:
        client.rollback(0)
        time.sleep(0.15)  # every instance applies a committed version from its next batch; give idle ones a poll
        yield client


def accuracy(client, images: np.ndarray, truth: np.ndarray) -> float:
    return float((labels(client, images) == truth).mean())


def test_observe_learns_the_ranked_layers_and_rollback_undoes_them(ctl, layered, badnets_eval):
    ev = badnets_eval
    status = ctl.status()
    assert status["repair_layers"] == ["block1", "block2"] and status["layers"] == {"block1": 0, "block2": 0}
    with grpcclient.InferenceServerClient(layered.grpc) as c:
        pa_before = accuracy(c, ev.poisoned, ev.poisoned_labels)
        result = ctl.observe(flagged_images(20), publish_every=20)
        time.sleep(0.15)
        pa_after, ca_after = accuracy(c, ev.poisoned, ev.poisoned_labels), accuracy(c, ev.clean, ev.labels)
        served = set(infer(c, ev.clean[:4])["DIRECTION_VERSION"].reshape(-1).tolist())
        status = ctl.status()
        ctl.rollback(0)
        time.sleep(0.15)
        pa_rolled_back = accuracy(c, ev.poisoned[:64], ev.poisoned_labels[:64])
    print(f"served PA {pa_before:.4f} -> {pa_after:.4f}, CA {ca_after:.4f}; layers {result['layers']}; "
          f"ranking {result['ranking']}")
    assert result["target"] == 0 and result["poisoned_count"] == 20 and len(result["versions"]) == 1
    ranking = result["ranking"]
    assert {tuple(r["layers"]) for r in ranking} == {("block1",), ("block2",), ("block1", "block2")}
    assert result["layers"] == ranking[0]["layers"] and status["ranking"] == ranking
    assert {layer for layer, n in status["layers"].items() if n} == set(result["layers"])
    assert served == {result["version"]}
    assert pa_before < 0.2 and pa_after >= 0.9 and ca_after >= 0.9
    assert pa_rolled_back < 0.2
    entry = ctl.history()["history"][-2]
    assert entry["action"] == "observe" and entry["layers"] == result["layers"] and entry["flagged"] == 20


def test_push_at_one_layer_keeps_the_others_in_one_new_version(ctl, layered, badnets_eval):
    learned = ctl.observe(flagged_images(20), publish_every=20)
    before = ctl.status()["layers"]
    store = DirectionStore(layered.repository / "artifacts" / "store")
    dim = store.read_version(learned["version"]).layered.sets["block1"].center.size
    pushed = ctl.push([{"beta": [0.01] * dim, "name": "op"}], layer="block1")
    assert pushed["version"] == learned["version"] + 1 and pushed["layer"] == "block1"
    after = ctl.status()["layers"]
    assert after == {"block1": 1, "block2": before["block2"]}
    version = store.read_version(pushed["version"])
    assert list(version.layered.sets) == ["block1", "block2"] and len(version.layered.flagged) == 20
    with pytest.raises(FireClientError, match="'layer' must be one of block1, block2"):
        ctl.push([{"beta": [0.01] * dim}], layer="fc1")
    assert ctl.status()["version"] == pushed["version"]  # the refusal changed nothing
    ctl.rollback(learned["version"])
    assert ctl.status()["layers"] == before
    with grpcclient.InferenceServerClient(layered.grpc) as c:
        time.sleep(0.15)
        assert set(infer(c, badnets_eval.clean[:4])["DIRECTION_VERSION"].reshape(-1).tolist()) == \
            {learned["version"]}
