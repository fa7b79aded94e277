"""A user's own network on the real tritonserver: brought in from a module file and from a torch.export program,
served in the default layout, learned online with `fire ctl observe`, and every served label equal to what the same
network computes offline with the same store version."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import infer
from test_control import flagged_images

from fire_backend.cli import main
from fire_backend.fire import RepairPass
from fire_backend.launcher.server import running_server
from fire_backend.models.user import load_module_file
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.training import TrainConfig, train_backdoored
from fire_backend.repository.build import build_repository
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings
from fire_backend.stores.files import DirectionStore
from fire_backend.stub.live_plan import plan_of
from fire_backend.wire.control import ControlClient
from fire_backend.wire.token import pinned_token

pytestmark = pytest.mark.integration

NETWORKS = Path(__file__).resolve().parents[1] / "unit" / "tiny_networks.py"
KWARGS = {"width": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """TinyRes (tests/unit/tiny_networks.py) backdoored with BadNets on digits by `fire train --module`; kept in
    FIRE_TEST_CACHE when set, as the digits checkpoints are."""
    cache = os.environ.get("FIRE_TEST_CACHE")
    root = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("user-network")
    out = root / "digits-tinyres-badnets"
    meta = out / "meta.json"
    if not meta.is_file() or json.loads(meta.read_text())["spec"].get("source", {}).get("sha256") is None:
        train_backdoored(TrainConfig(module=f"{NETWORKS}:build", kwargs=KWARGS, epochs=20), out, progress=False)
    return out


@pytest.fixture(scope="module")
def imported(trained: Path, tmp_path_factory) -> dict[str, Path]:
    """The trained network brought in both ways a user ships one: its module file and state dict, and a .pt2."""
    root = tmp_path_factory.mktemp("imported")
    common = ["--data", "digits", "--attack", "badnets", "--target", "0"]
    assert main(["import", "model", "--module", f"{NETWORKS}:build", "--kwargs", json.dumps(KWARGS), "--weights",
                 str(trained / "model.pt"), *common, "--out", str(root / "module")]) == 0
    network, _ = load_checkpoint(trained)
    program = root / "tinyres.pt2"
    load_module_file(NETWORKS).export(network.model, str(program))  # what the user runs to ship a .pt2
    assert main(["import", "model", "--exported", str(program), *common, "--out", str(root / "exported")]) == 0
    return {"module": root / "module", "exported": root / "exported"}


@pytest.mark.parametrize("form", ["module", "exported"])
def test_a_user_network_served_fused_learns_online_and_labels_equal_offline(form, imported, badnets_eval,
                                                                           tmp_path: Path) -> None:
    checkpoint = imported[form]
    repository = tmp_path / "repository"
    settings = build_repository(checkpoint, repository)  # the default build: no layer, no attack named
    assert settings.layout == "fused" and settings.repair_layers == ("early", "down")
    token = secrets.token_urlsafe(16)
    ev = badnets_eval
    with running_server(repository, extra_env=pinned_token(token)) as server:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(server.urls["grpc"]) as client, \
                ControlClient(server.urls["grpc"], token) as ctl:
            before = infer(client, ev.poisoned[:64])["LABEL"].reshape(-1)
            learned = ctl.observe(flagged_images(20), publish_every=20)
            time.sleep(0.15)  # every instance applies the new version from its next batch
            served = {name: [infer(client, images[i:i + 32]) for i in range(0, len(images), 32)]
                      for name, images in (("clean", ev.clean), ("poisoned", ev.poisoned))}
    assert learned["target"] == 0 and learned["layers"]
    net, _ = load_checkpoint(checkpoint)
    version = DirectionStore(repository / ARTIFACTS_DIR / "store").read_version(learned["version"])
    plan = plan_of(version, ServingSettings.read(repository / ARTIFACTS_DIR), torch.device("cpu"))
    for name, images in (("clean", ev.clean), ("poisoned", ev.poisoned)):
        with torch.inference_mode():
            offline = net(torch.from_numpy(images), RepairPass(plan).hooks)
        got = np.concatenate([r["LABEL"].reshape(-1) for r in served[name]])
        assert np.array_equal(got, offline.argmax(1).numpy()), f"{form}: {name} labels differ from offline"
        assert np.allclose(np.concatenate([r["LOGITS"] for r in served[name]]), offline.numpy(), atol=1e-4)
        assert {int(v) for r in served[name] for v in r["DIRECTION_VERSION"].reshape(-1)} == {learned["version"]}
    pa_before = float((before == ev.poisoned_labels[:64]).mean())
    pa_after = float((np.concatenate([r["LABEL"].reshape(-1) for r in served["poisoned"]]) == ev.poisoned_labels)
                     .mean())
    ca_after = float((np.concatenate([r["LABEL"].reshape(-1) for r in served["clean"]]) == ev.labels).mean())
    print(f"{form}: served PA {pa_before:.3f} -> {pa_after:.3f}, CA {ca_after:.3f}, layers {learned['layers']}")
    assert pa_before < 0.3 and pa_after >= 0.8 and ca_after >= 0.8
