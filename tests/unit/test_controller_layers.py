"""The control logic of a repository repairing at several layers (the default build), on a backdoored digits model:
observe learns every layer from the same flagged images and ranks the layer subsets without labels; push, status
and rollback work per layer; one version number covers all layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_controller import TOKEN, act, snapshot

from fire_backend.data.datasets import to_uint8
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.evaluation import load_defender_samples
from fire_backend.repository.build import build_repository
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings
from fire_backend.stub.controller import ControlError, Controller
from fire_backend.stub.live_plan import plan_of
from fire_backend.stub.stages import load_network

LAYERS = ("block1", "block2")


@pytest.fixture(scope="module")
def built(digits_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    checkpoint = digits_checkpoint("badnets")
    out = tmp_path_factory.mktemp("layers") / "repo"
    settings = build_repository(checkpoint, out)  # no layer named: the measured default pair, version 0
    assert settings.repair_layers == LAYERS
    _, meta = load_checkpoint(checkpoint)
    flagged = load_defender_samples(meta.dataset, meta.attack, meta.target, 100, 20).flagged
    return out / ARTIFACTS_DIR, to_uint8(flagged)


@pytest.fixture
def controller(built) -> Controller:
    artifacts, _ = built
    network = load_network(artifacts, torch.device("cpu"))
    settings = ServingSettings.read(artifacts)
    controller = Controller(artifacts, TOKEN, lambda x: network.latents(x, settings.layer), network)
    act(controller, "rollback", version=0)
    return controller


def test_observe_learns_every_layer_as_one_version_and_records_the_ranking(controller, built) -> None:
    _, flagged = built
    assert act(controller, "status")["layers"] == {"block1": 0, "block2": 0}
    result = act(controller, "observe", flagged, publish_every=20)
    assert len(result["versions"]) == 1 and result["target"] == 0 and result["poisoned_count"] == 20
    ranking = result["ranking"]
    assert sorted(tuple(r["layers"]) for r in ranking) == [("block1",), ("block1", "block2"), ("block2",)]
    rest = [r["score"] for r in ranking[1:]]  # best first; the pair may lead on a tie within one image (1/20)
    assert rest == sorted(rest, reverse=True) and ranking[0]["score"] >= max(rest) - 1 / 20 - 1e-9
    status = act(controller, "status")
    assert status["version"] == result["version"] and status["flagged_kept"] == 20 and status["ranking"] == ranking
    assert {layer for layer, n in status["layers"].items() if n} == set(result["layers"]) == set(ranking[0]["layers"])
    history = act(controller, "history")["history"][-1]
    assert history["layers"] == result["layers"] and history["estimation"] == "independent"
    version = controller.store.read_version(result["version"])
    plan = plan_of(version, controller.settings, torch.device("cpu"))
    assert plan.layers == tuple(result["layers"])


def test_observe_again_re_estimates_from_every_flagged_image_kept(controller, built) -> None:
    _, flagged = built
    first = act(controller, "observe", flagged[:10])  # several layers: one version per request by default
    second = act(controller, "observe", flagged[10:], publish_every=5)
    assert len(first["versions"]) == 1 and len(second["versions"]) == 2 and second["poisoned_count"] == 20
    assert second["version"] > first["version"] and act(controller, "status")["flagged_kept"] == 20


def test_push_at_a_layer_replaces_its_set_keeps_the_others_and_rollback_restores_every_layer(controller, built) -> None:
    _, flagged = built
    learned = act(controller, "observe", flagged, publish_every=20)
    before = act(controller, "status")["layers"]
    dim = controller.settings.layer_dims["block1"]
    pushed = act(controller, "push", directions=[{"beta": [1.0] * dim, "name": "op"}], layer="block1")
    after = act(controller, "status")["layers"]
    assert after["block1"] == 1 and after["block2"] == before["block2"]  # a push replaces that layer's set only
    assert pushed["layer"] == "block1" and pushed["version"] == learned["version"] + 1
    act(controller, "rollback", version=learned["version"])
    assert act(controller, "status")["layers"] == before


def test_refusals_change_nothing(controller, built) -> None:
    artifacts, flagged = built
    before = snapshot(artifacts)
    with pytest.raises(ControlError, match="'layer' must be one of block1, block2"):
        act(controller, "push", directions=[{"beta": [1.0]}], layer="fc1")
    with pytest.raises(ControlError, match="block1 .*norm|values; the latent has"):
        act(controller, "push", directions=[{"beta": [1.0, 2.0]}], layer="block1")
    with pytest.raises(ControlError, match="observe flagged images only"):
        act(controller, "observe", flagged, clean=True)
    with pytest.raises(ControlError, match="unpaired estimator only"):
        act(controller, "observe", flagged, estimator="augmented")
    assert snapshot(artifacts).keys() >= before.keys()
    assert act(controller, "status")["version"] == 0


def test_build_with_flagged_samples_ranks_and_learns_every_layer_offline(digits_checkpoint, tmp_path) -> None:
    from fire_backend.stores.files import DirectionStore

    build_repository(digits_checkpoint("badnets"), tmp_path / "repo", flagged=20)
    store = DirectionStore(tmp_path / "repo" / ARTIFACTS_DIR / "store")
    version = store.read_version(store.live_version())
    layered = version.layered
    assert version.number == 1 and list(layered.sets) == list(LAYERS) and len(layered.flagged) == 20
    chosen = layered.ranking[0]["layers"]
    assert [layer for layer, n in layered.counts("block2").items() if n] == chosen
    assert store.history()[-1]["layers"] == chosen


def test_a_push_that_changes_too_many_clean_predictions_is_refused_unless_forced(controller, built) -> None:
    """Issue 25: one signed push within every bound (constant mode, alpha 10, along the clean centroid) took CA from
    0.99 to 0.10 with no warning. It is measured on the defender's clean reserve first and refused above the
    repository's limit; --force commits it, and the history records the figure either way."""
    artifacts, _ = built
    center = controller._live_layers().sets["block2"].center
    harmful = {"beta": center.tolist(), "alpha": 10.0, "mode": "constant", "name": "along-the-centroid"}
    before = snapshot(artifacts)
    refusal = r"changes \d+\.\d% of the defender's clean reserve predictions \(at most 5%"
    with pytest.raises(ControlError, match=refusal):
        act(controller, "push", layer="block2", directions=[harmful])
    assert snapshot(artifacts) == before
    forced = act(controller, "push", layer="block2", directions=[harmful], force=True)
    assert forced["clean_change"] > 0.5
    entry = act(controller, "history")["history"][-1]
    assert (entry["version"], entry["clean_change"], entry["forced"]) == (forced["version"],
                                                                          round(forced["clean_change"], 4), True)
    act(controller, "rollback", version=0)
    ok = act(controller, "push", layer="block2", directions=[{"beta": [1e-3] * len(center), "name": "small"}])
    assert ok["clean_change"] <= 0.05 and act(controller, "history")["history"][-1]["forced"] is False
