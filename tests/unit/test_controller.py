"""The control logic without Triton: request-bound credentials, the typed request schema, every action, and
refusals that change nothing.

The "head" is a fixed linear map of the image, so the expected estimates are computed here independently.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fire_backend.procfs import this_host
from fire_backend.repository.layout import STORE_DIR, ServingSettings, save_centroid
from fire_backend.stores.files import DirectionStore
from fire_backend.stores.format import Conflict
from fire_backend.stub import controller as controller_module
from fire_backend.stub.controller import ControlError, Controller, token_id
from fire_backend.wire.auth import BYPASS, CONTROL, digest, sign

TOKEN = "s3cret-token"
SHAPE = (1, 4, 4)  # C, H, W
DIM = 16
CLEAN_COUNT = 100
WEIGHTS = torch.from_numpy(np.random.default_rng(0).standard_normal((DIM, DIM)).astype(np.float32))


def head(batch: torch.Tensor) -> torch.Tensor:
    return batch.reshape(len(batch), -1) @ WEIGHTS


def images(n: int, seed: int, trigger: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 200, (n, *SHAPE[1:], SHAPE[0]), dtype=np.uint8)
    if trigger:
        x[:, -2:, -2:, :] = 255
    return x


def latents(x: np.ndarray) -> torch.Tensor:
    return head(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    ServingSettings(layer="block", input_shape=SHAPE, latent_shape=(DIM,), num_classes=10, arch="test").write(tmp_path)
    save_centroid(tmp_path, latents(images(CLEAN_COUNT, 1)).mean(0).numpy(), CLEAN_COUNT)
    DirectionStore(tmp_path / STORE_DIR).initialize()  # as `fire repo build` does: a controller never creates one
    return tmp_path


@pytest.fixture
def controller(artifacts: Path) -> Controller:
    return Controller(artifacts, TOKEN, head)


def call(controller: Controller, body: dict | bytes, images_: np.ndarray | None = None, token: str = TOKEN,
         purpose: str = CONTROL, now: float | None = None) -> dict:
    """What ControlClient sends: the request's bytes and a credential signed for them (and the images)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    pixels = b"" if images_ is None else np.ascontiguousarray(images_).tobytes()
    credential = sign(token, purpose, digest(raw, pixels), now=now) if token else ""
    return controller.handle(raw, credential, images_, now=now)


def act(controller: Controller, action: str, images_: np.ndarray | None = None, **request) -> dict:
    return call(controller, {"action": action, **request}, images_)


def snapshot(artifacts: Path) -> dict[str, bytes]:
    """The store's files, its request nonces left out: a refused request changes no version, pointer or history line
    (its nonce is recorded, so it cannot be replayed either)."""
    root = artifacts / STORE_DIR
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != "nonces"}


def direction(seed: int, **extra) -> dict:
    beta = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return {"beta": beta.tolist(), "name": f"op-{seed}", **extra}


def test_status_of_a_fresh_store(controller: Controller) -> None:
    status = act(controller, "status")
    assert status["version"] == 0 and status["directions"] == [] and status["estimator"] is None
    assert status["latent_shape"] == [DIM] and status["layer"] == "block"


@pytest.mark.parametrize("token", ["", "wrong", TOKEN + "x"])
def test_a_wrong_token_is_refused_and_changes_nothing(controller: Controller, artifacts: Path, token: str) -> None:
    before = snapshot(artifacts)
    with pytest.raises(ControlError, match="permission denied"):
        call(controller, {"action": "push", "directions": [direction(1)]}, token=token)
    assert snapshot(artifacts) == before


def test_a_server_without_a_token_refuses_everything(artifacts: Path) -> None:
    with pytest.raises(ControlError, match="no control token configured"):
        call(Controller(artifacts, None, head), {"action": "status"})


def test_the_token_never_travels_and_a_credential_is_good_for_its_own_request_once(
        controller: Controller, artifacts: Path) -> None:
    raw = json.dumps({"action": "push", "directions": [direction(1)]}).encode()
    credential = sign(TOKEN, CONTROL, digest(raw, b""))
    assert TOKEN not in credential
    assert controller.handle(raw, credential, None)["version"] == 1
    before = snapshot(artifacts)
    refused = {
        "replayed": (raw, credential),
        "another request": (json.dumps({"action": "rollback", "version": 0}).encode(), credential),
        "the bare token": (raw, TOKEN),
        "bypass purpose": (raw, sign(TOKEN, BYPASS, digest(raw, b""))),
        "expired": (raw, sign(TOKEN, CONTROL, digest(raw, b""), now=1_000_000.0)),
        "not ASCII": (raw, b"\xff\xfe" + credential.encode()),
    }
    for case, (request, cred) in refused.items():
        with pytest.raises(ControlError, match="permission denied") as info:
            controller.handle(request, cred, None)
        assert TOKEN not in str(info.value), case
    assert snapshot(artifacts) == before


@pytest.mark.parametrize("action", [{"action": "push", "directions": [direction(1)]}, {"action": "status"},
                                    {"action": "history"}], ids=["push", "status", "history"])
def test_a_replay_against_another_controller_on_the_same_store_is_refused(artifacts: Path, action: dict) -> None:
    """Every request's nonce is recorded in the store: a second server (or a restarted one) refuses the replay, of a
    read-only request too (issue 25: read-only credentials could be replayed there)."""
    raw = json.dumps(action).encode()
    credential = sign(TOKEN, CONTROL, digest(raw, b""))
    Controller(artifacts, TOKEN, head).handle(raw, credential, None)
    with pytest.raises(ControlError, match="already used"):
        Controller(artifacts, TOKEN, head).handle(raw, credential, None)
    committed = 1 if action["action"] == "push" else 0
    assert [e["version"] for e in Controller(artifacts, TOKEN, head).store.history()] == [1] * committed


def test_a_read_only_request_is_served_when_the_store_cannot_record_its_nonce(artifacts: Path) -> None:
    """The store gone (a volume that did not mount): status still answers and names it, guarded in memory only; a
    writer fails, and nothing is created."""
    controller = Controller(artifacts, TOKEN, head)
    (artifacts / STORE_DIR).rename(artifacts / "away")
    status = act(controller, "status")
    assert status["version"] is None and status["damage"] == ["store directory missing"] and status["degraded"]
    with pytest.raises(ControlError, match="store directory missing"):
        act(controller, "push", directions=[direction(1)])
    assert not (artifacts / STORE_DIR).exists()


def test_push_commits_a_version(controller: Controller, artifacts: Path) -> None:
    result = act(controller, "push", directions=[direction(1, alpha=0.5, mode="constant", threshold=0.3)])
    # no network here: the clean change is not measured
    assert result == {"version": 1, "action": "push", "layer": "block", "clean_change": None}
    status = act(controller, "status")
    (d,) = status["directions"]
    assert status["version"] == 1
    assert (d["name"], d["alpha"], d["mode"], d["threshold"]) == ("op-1", 0.5, "constant", 0.3)
    history = act(controller, "history")["history"]
    assert history[-1]["actor"] == token_id(TOKEN)
    assert TOKEN not in (artifacts / STORE_DIR / "history.jsonl").read_text()


REFUSED = {
    "unknown action": ({"action": "format-disk"}, None, "unknown action"),
    "no action": ({"version": 1}, None, "unknown action null"),
    "action not a string": ({"action": ["push"]}, None, "unknown action a list"),
    "not an object": ([1, 2], None, "must be a JSON object"),
    "not JSON": (b"{push", None, "not UTF-8 JSON"),
    "not UTF-8": (b'{"action": "status\xff"}', None, "not UTF-8 JSON"),
    "unknown field": ({"action": "status", "verbose": True}, None, "unknown field 'verbose'"),
    "unknown direction field": ({"action": "push", "directions": [direction(1, scale=2.0)]}, None,
                                "direction 0: unknown field 'scale'"),
    "no directions": ({"action": "push", "directions": []}, None, "non-empty list"),
    "directions not objects": ({"action": "push", "directions": [[1.0] * DIM]}, None, "non-empty list of objects"),
    "beta of strings": ({"action": "push", "directions": [direction(1, beta=["1"] * DIM)]}, None,
                        "list of JSON numbers"),
    "beta of booleans": ({"action": "push", "directions": [direction(1, beta=[True] * DIM)]}, None,
                         "list of JSON numbers"),
    "beta huge": ({"action": "push", "directions": [direction(1, beta=[10**400] * DIM)]}, None, "too large"),
    "alpha a string": ({"action": "push", "directions": [direction(1, alpha="0.5")]}, None,
                       "'alpha' must be a JSON number, not the string \"0.5\""),
    "alpha a boolean": ({"action": "push", "directions": [direction(1, alpha=True)]}, None, "the boolean true"),
    "name a number": ({"action": "push", "directions": [direction(1, name=3)]}, None, "'name' must be a JSON string"),
    "center of strings": ({"action": "push", "directions": [direction(1)], "center": ["0"] * DIM}, None,
                          "'center' must be a list of JSON numbers"),
    "NaN": ({"action": "push", "directions": [direction(1, beta=[float("nan")] * DIM)]}, None, "NaN"),
    "wrong size": ({"action": "push", "directions": [direction(1, beta=[1.0] * (DIM - 1))]}, None, f"has {DIM}"),
    "alpha": ({"action": "push", "directions": [direction(1, alpha=1e9)]}, None, "alpha"),
    "mode": ({"action": "push", "directions": [direction(1, mode="bogus")]}, None, "mode"),
    "too many": ({"action": "push", "directions": [direction(i) for i in range(9)]}, None, "at most 8"),
    "center": ({"action": "push", "directions": [direction(1)], "center": [0.0] * 3}, None, "center"),
    "no images": ({"action": "observe"}, None, "needs IMAGES"),
    "image shape": ({"action": "observe"}, np.zeros((2, 4, 4, 3), np.uint8), "uint8 N x 4 x 4 x 1"),
    "too many images": ({"action": "observe"}, np.zeros((300, 4, 4, 1), np.uint8), "1 to 256"),
    # issue 24: what one request may carry is bounded (REQUEST and IMAGES together), so the control stub's region
    # never grows; the clients split a large observe
    "images over the bound": ({"action": "observe"}, np.zeros((70_000, 4, 4, 1), np.uint8), "split it"),
    "request over the bound": ({"action": "push", "directions": [direction(1, name="n" * (1 << 20))]}, None,
                               "at most 1048576"),
    "estimator": ({"action": "observe", "estimator": "paired"}, images(2, 3), "'estimator' must be one of"),
    "publish_every": ({"action": "observe", "publish_every": 0}, images(2, 3), "publish_every"),
    # issue 12, finding 7: "false" counted as clean, "abc" gave a traceback; floats and booleans slipped through
    "clean a string": ({"action": "observe", "clean": "false"}, images(2, 3),
                       "'clean' must be a JSON boolean (true or false), not the string \"false\""),
    "clean a number": ({"action": "observe", "clean": 0}, images(2, 3), "JSON boolean"),
    "publish_every a string": ({"action": "observe", "publish_every": "abc"}, images(2, 3),
                               "'publish_every' must be a JSON integer, not the string \"abc\""),
    "publish_every a float": ({"action": "observe", "publish_every": 2.5}, images(2, 3), "JSON integer"),
    "publish_every a boolean": ({"action": "observe", "publish_every": True}, images(2, 3), "JSON integer"),
    "rollback number": ({"action": "rollback", "version": -1}, None, "'version' must be >= 0"),
    "rollback a string": ({"action": "rollback", "version": "1"}, None, "'version' must be a JSON integer"),
    "rollback a float": ({"action": "rollback", "version": 1.0}, None, "JSON integer"),
    "rollback missing": ({"action": "rollback"}, None, "'version' is required"),
    "rollback unknown": ({"action": "rollback", "version": 42}, None, "never committed"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_actions_change_nothing(controller: Controller, artifacts: Path, case: str) -> None:
    act(controller, "push", directions=[direction(7)])
    before = snapshot(artifacts)
    request, images_, message = REFUSED[case]
    with pytest.raises(ControlError) as info:
        call(controller, request, images_)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert snapshot(artifacts) == before
    assert act(controller, "status")["version"] == 1


def test_observe_learns_the_unpaired_direction_and_publishes_every_k(controller: Controller, artifacts: Path) -> None:
    flagged = images(6, 2, trigger=True)
    result = act(controller, "observe", flagged, publish_every=4)
    assert result["versions"] == [1, 2] and result["version"] == 2  # after 4 images, then after the last 2
    assert (result["poisoned_count"], result["clean_count"]) == (6, CLEAN_COUNT)
    learned = controller.store.read_version(2).directions.directions[0]
    center = latents(images(CLEAN_COUNT, 1)).double().mean(0)
    expected = (latents(flagged).double().mean(0) - center).float()
    assert learned.name == "learned"
    torch.testing.assert_close(learned.beta, expected, rtol=1e-4, atol=1e-4)
    act(controller, "observe", images(2, 4, trigger=True))  # a later call resumes the same estimate
    assert act(controller, "status")["estimator"]["poisoned_count"] == 8


def test_clean_observations_refine_the_centroid(controller: Controller) -> None:
    result = act(controller, "observe", images(10, 5), clean=True)
    assert (result["poisoned_count"], result["clean_count"]) == (0, CLEAN_COUNT + 10)
    assert act(controller, "status")["directions"] == []  # nothing learned yet


def test_the_augmented_estimator_and_a_mismatch(controller: Controller) -> None:
    result = act(controller, "observe", images(3, 6, trigger=True), estimator="augmented", publish_every=3)
    assert result["versions"] == [1] and act(controller, "status")["estimator"]["kind"] == "augmented"
    with pytest.raises(ControlError, match="live estimate is 'augmented'"):
        act(controller, "observe", images(1, 7, trigger=True), estimator="unpaired")


def test_rollback_restores_an_earlier_version_and_0(controller: Controller) -> None:
    act(controller, "push", directions=[direction(1)])
    act(controller, "push", directions=[direction(2)])
    assert act(controller, "rollback", version=1) == {"version": 1, "action": "rollback"}
    assert [d["name"] for d in act(controller, "status")["directions"]] == ["op-1"]
    act(controller, "rollback", version=0)
    status = act(controller, "status")
    assert status["version"] == 0 and status["directions"] == []
    assert act(controller, "push", directions=[direction(3)])["version"] == 3


def test_status_names_the_damage_and_what_a_restart_would_apply(controller: Controller, artifacts: Path) -> None:
    act(controller, "push", directions=[direction(1)])
    act(controller, "push", directions=[direction(2)])
    path = controller.store.version_path(2)
    path.write_bytes(path.read_bytes()[:-10])
    status = act(controller, "status")
    assert (status["version"], status["verified_version"]) == (2, 1)
    assert [d["name"] for d in status["directions"]] == ["op-1"]
    assert any(line.startswith("version 2: checksum mismatch") for line in status["damage"])
    assert str(artifacts) not in json.dumps(status)  # no server paths
    with pytest.raises(ControlError, match="live version 2 is damaged"):
        act(controller, "observe", images(2, 3, trigger=True))
    act(controller, "rollback", version=1)
    assert act(controller, "status")["damage"] == []


def test_status_shows_each_instances_version_and_lag_and_marks_gone_ones(controller: Controller) -> None:
    pushed = act(controller, "push", directions=[direction(1)])["version"]
    controller.store.registry.report("fire_repair_0_0-here", pushed, 0.012)
    controller.store.registry.report("fire_repair_0_1-started", pushed)  # started on it: no propagation
    controller.store.registry.report("fire_repair_0_2-behind", 0)
    stale = {"instance": "fire_repair_0_3-gone", "version": 0, "pid": 2**22 + 1, "host": this_host()}
    (controller.store.instances_dir / "fire_repair_0_3-gone.json").write_text(json.dumps(stale))
    status = act(controller, "status")
    listed = {i["instance"]: (i["version"], i["lag_s"], i["behind_s"] is not None) for i in status["instances"]}
    assert listed == {"fire_repair_0_0-here": (pushed, 0.012, False), "fire_repair_0_1-started": (pushed, None, False),
                      "fire_repair_0_2-behind": (0, None, True)}
    behind = next(i["behind_s"] for i in status["instances"] if i["version"] == 0)
    committed = controller.store.history()[-1]["time"]
    assert 0 <= behind <= time.time() - committed  # seconds since the live version's commit
    assert [(g["instance"], g["version"]) for g in status["gone"]] == [("fire_repair_0_3-gone", 0)]


class FakePb:
    """The few pieces of triton_python_backend_utils that ControlStage touches (a faithful double: the real stub
    runs in tests/security)."""

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message: str, code: str) -> None:
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors: list, error=None) -> None:
            self.output_tensors, self.error = output_tensors, error

    @staticmethod
    def get_input_tensor_by_name(request: dict, name: str):
        return request.get(name)


def test_the_control_stage_answers_refusals_and_failures_without_tracebacks(controller: Controller) -> None:
    from observability import Exposition
    from pb_metrics_double import PbMetrics

    from fire_backend import metric_families as mf
    from fire_backend.stub import metrics as m
    from fire_backend.stub.control_stage import REFUSED_LABEL_BYTES, ControlStage
    from fire_backend.stub.controller import ACTIONS

    server = PbMetrics()
    stage = ControlStage.__new__(ControlStage)
    stage.pb, stage.controller = FakePb, controller
    stage.metrics = m.ControlMetrics(server, "fire_control", "fire_control_0_0", ACTIONS,
                                     config=m.MetricsConfig(flush_interval_s=3600.0))

    def request(body: bytes, credential: bytes) -> dict:
        return {name: FakePb.Tensor(name, np.array([value], dtype=np.object_))
                for name, value in (("REQUEST", body), ("TOKEN", credential))}

    raw = json.dumps({"action": "status"}).encode()
    good = request(raw, sign(TOKEN, CONTROL, digest(raw, b"")).encode())
    refused = request(raw, b"nonsense")
    controller.latents = None  # not used by status
    ok, no = stage.execute([good, refused])
    assert ok.error is None and json.loads(ok.output_tensors[0].array[0])["version"] == 0
    assert no.error.code == "INVALID_ARG" and no.error.message.startswith("permission denied")

    def broken(*_args, **_kwargs):
        raise RuntimeError(f"{controller.artifacts}/store/CURRENT: something deep went wrong")

    unknown = json.dumps({"action": "status", "verbose": True}).encode()
    (invalid,) = stage.execute([request(unknown, sign(TOKEN, CONTROL, digest(unknown, b"")).encode())])
    assert invalid.error.code == "INVALID_ARG" and "unknown field" in invalid.error.message
    (garbage,) = stage.execute([request(b"\xff not json", b"nonsense")])
    assert garbage.error.code == "INVALID_ARG"
    padded = json.dumps({"action": "push", "directions": [{"beta": [0.0] * REFUSED_LABEL_BYTES}]}).encode()
    (big,) = stage.execute([request(padded, b"nonsense")])  # refused unread: its label is not parsed either
    assert big.error.code == "INVALID_ARG"

    controller.handle = broken
    (failed,) = stage.execute([request(raw, b"x")])
    assert failed.error.code == "INTERNAL" and str(controller.artifacts) not in failed.error.message
    assert failed.error.message == "fire_control: internal error; the server log has the details"

    # Every action counted once, by the action it names and how it ended.
    stage.metrics.flush()
    page = Exposition(server.exposition())
    counted = {(s.labels["action"], s.labels["result"]): s.value
               for s in page.select(mf.CONTROL_ACTIONS_TOTAL.name) if s.value}
    assert counted == {("status", mf.RESULT_OK): 1, ("status", mf.RESULT_REFUSED_AUTH): 1,
                       ("status", mf.RESULT_REFUSED_VALIDATION): 1, (mf.OTHER_ACTION, mf.RESULT_REFUSED_AUTH): 2,
                       ("status", mf.RESULT_ERROR): 1}
    stage.metrics.close()


def test_a_block_that_keeps_losing_races_runs_again_until_it_lands_or_its_deadline(
        controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers with several commits each lost to each other more than a fixed number of times on a slow machine;
    a lost block pauses a random, doubling while and runs again until the deadline."""
    losses = {"left": 12}

    def block() -> str:
        if losses["left"]:
            losses["left"] -= 1
            raise Conflict("another writer got in first")
        return "landed"

    assert controller._atomically(block) == "landed" and losses["left"] == 0
    monkeypatch.setattr(controller_module, "CONFLICT_DEADLINE_S", 0.05)
    losses["left"] = 10**6
    with pytest.raises(ControlError, match="changed under this request"):
        controller._atomically(block)


def test_a_commit_a_killed_writer_left_half_published_is_finished_when_the_control_stage_loads(artifacts: Path) -> None:
    """kill -9 between the history line and CURRENT: the commit was never acknowledged, the history has it; the next
    control process (the supervisor reloads it) finishes it, so instances apply it and status names no damage."""
    store = DirectionStore(artifacts / STORE_DIR)
    act(Controller(artifacts, TOKEN, head), "push", directions=[direction(1)])
    before = store.current_path.read_bytes()
    act(Controller(artifacts, TOKEN, head), "push", directions=[direction(2)])
    store.current_path.write_bytes(before)  # as if killed before CURRENT was rewritten
    assert "CURRENT names version 1, the history version 2" in store.resolve().damage
    Controller(artifacts, TOKEN, head)
    assert store.read_pointer()[0] == 2 and store.resolve().damage == ()
