"""Control endpoint on the real tritonserver: live pushes, online learning, auth, validation, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import DEFENDED, EVERY_LAYOUT, infer, labels

from fire_backend.data import load_dataset, resolve_attack, to_uint8
from fire_backend.data.reserve import flagged_samples
from fire_backend.launcher.server import STUB_REGION_BYTES, running_server
from fire_backend.launcher.stub_health import stub_args
from fire_backend.procfs import child_processes, is_running
from fire_backend.repository.layout import ServingSettings
from fire_backend.stores.files import DirectionStore
from fire_backend.wire.control import ControlClient
from fire_backend.wire.errors import FireClientError
from fire_backend.wire.names import FIRE_CONTROL, FIRE_ENSEMBLE, MAX_CONTROL_REQUEST_BYTES
from fire_backend.wire.token import pinned_token

pytestmark = pytest.mark.integration


def flagged_images(n: int) -> np.ndarray:
    """The defender's flagged samples from its reserve (disjoint from the evaluation images)."""
    data = load_dataset("digits")
    return to_uint8(flagged_samples(data.x_test, data.y_test, resolve_attack("badnets"), 0, n).poisoned)


def store_snapshot(repository) -> tuple:
    store = DirectionStore(repository / "artifacts" / "store")
    files = sorted(p.name for p in store.versions_dir.iterdir())
    return store.read_pointer(), store.history_path.read_bytes(), files


def random_direction(dim: int, seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {"beta": (rng.standard_normal(dim) * scale).astype(np.float32).tolist(), "name": f"op-{seed}"}


@pytest.fixture
def ctl(learning):
    with ControlClient(learning.grpc, learning.token) as client:
        client.rollback(0)
        yield client


#: instances that apply directions: fused fire_ensemble, the inline head, the separate repair stage
REPAIRING_INSTANCES = EVERY_LAYOUT.model_instances + EVERY_LAYOUT.head_instances + EVERY_LAYOUT.repair_instances


def test_observing_20_flagged_samples_repairs_served_traffic_in_every_layout(ctl, learning, badnets_eval):
    """Online learning reaches every layout; rolling back to version 0 lets the attack through everywhere again."""
    ev = badnets_eval
    with grpcclient.InferenceServerClient(learning.grpc) as c:
        undefended_ca = (labels(c, ev.clean, "undefended_ensemble") == ev.labels).mean()
        assert ctl.status()["version"] == 0
        time.sleep(0.15)
        pa_before = {m: (labels(c, ev.poisoned, m) == ev.poisoned_labels).mean() for m in DEFENDED}
        result = ctl.observe(flagged_images(20))
        assert result["poisoned_count"] == 20 and len(result["versions"]) == 20  # republished after each
        time.sleep(0.15)
        pa_after = {m: (labels(c, ev.poisoned, m) == ev.poisoned_labels).mean() for m in DEFENDED}
        ca_after = {m: (labels(c, ev.clean, m) == ev.labels).mean() for m in DEFENDED}
        versions = {m: set(infer(c, ev.clean[:2], m)["DIRECTION_VERSION"].reshape(-1).tolist()) for m in DEFENDED}
        status = ctl.status()
        ctl.rollback(0)
        time.sleep(0.15)
        pa_rolled_back = {m: (labels(c, ev.poisoned[:64], m) == ev.poisoned_labels[:64]).mean() for m in DEFENDED}
    print(f"served PA {pa_before} -> {pa_after}; CA {ca_after} (undefended {undefended_ca:.4f})")
    for model in DEFENDED:
        assert pa_before[model] < 0.1, model
        assert pa_after[model] >= 0.9, model
        assert ca_after[model] >= undefended_ca - 0.01, model
        assert versions[model] == {result["version"]}, model
        assert pa_rolled_back[model] < 0.1, model
    assert status["estimator"]["poisoned_count"] == 20
    assert {i["version"] for i in status["instances"]} == {result["version"]}
    assert len(status["instances"]) == REPAIRING_INSTANCES


def test_augmented_estimator_and_clean_observations(ctl, learning):
    clean = load_dataset("digits").x_test[:50]
    r = ctl.observe(clean, clean=True)
    assert r["clean_count"] == 150 and r["poisoned_count"] == 0
    r = ctl.observe(flagged_images(5), estimator="augmented", publish_every=5)
    assert r["poisoned_count"] == 5 and len(r["versions"]) == 1
    with pytest.raises(FireClientError, match="live estimate is 'augmented'"):
        ctl.observe(flagged_images(2), estimator="unpaired")


def test_a_large_observe_goes_in_bounded_requests_and_reloads_nothing(ctl, learning):
    """Issue 24: an observe larger than one control request went as one request: it grew fire_control's
    shared-memory region past its limit, the supervisor reloaded fire_control, and the reload could abort the whole
    server under load. The client now splits it into requests within the bound; the region keeps the size every
    stub starts with, and tritonserver loads nothing."""
    images = np.repeat(flagged_images(20), 2000, axis=0)  # 40,000 images, 2.4 x the bound
    assert images.nbytes > 2 * MAX_CONTROL_REQUEST_BYTES
    log = learning.server.log_path
    offset = log.stat().st_size
    result = ctl.observe(images, publish_every=len(images), chunk=256)
    assert result["requests"] == 157 and len(result["versions"]) == 157
    assert result["poisoned_count"] == 40_000 == ctl.status()["estimator"]["poisoned_count"]
    stubs = [stub for stub in map(stub_args, child_processes(learning.server.pid))
             if stub is not None and stub.model == FIRE_CONTROL]
    assert stubs and all(learning.server.region_path(stub.region).stat().st_size == STUB_REGION_BYTES for stub in stubs)
    with open(log, "rb") as fh:
        fh.seek(offset)
        since = fh.read().decode(errors="replace")
    assert "loading:" not in since and "unloaded" not in since, since[-2000:]


def test_push_reaches_every_instance_within_100ms(ctl, learning, badnets_eval):
    dim = ServingSettings.read(learning.repository / "artifacts").latent_dim
    records: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic(model: str) -> None:
        with grpcclient.InferenceServerClient(learning.grpc) as c:
            while not stop.is_set():
                sent = time.monotonic()
                records.append((sent, int(infer(c, badnets_eval.clean[:2], model)["DIRECTION_VERSION"][0, 0])))

    threads = [threading.Thread(target=traffic, args=(model,)) for model in (*DEFENDED, FIRE_ENSEMBLE)]
    for t in threads:
        t.start()
    try:
        pushes = []
        for seed in range(5):
            time.sleep(0.3)
            began = time.monotonic()
            version = ctl.push([random_direction(dim, seed, 0.01)])["version"]
            pushes.append((began, time.monotonic(), version))
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    # Requests sent from 100 ms after a push returned until the next push began carry its version.
    for (_, returned, version), nxt in zip(pushes, [*pushes[1:], (float("inf"), None, None)], strict=True):
        late = [v for sent, v in records if returned + 0.1 < sent < nxt[0]]
        assert late and all(v == version for v in late), (version, late[:10])
    instances = ctl.status()["instances"]
    assert len(instances) == REPAIRING_INSTANCES
    assert {i["version"] for i in instances} == {pushes[-1][2]}


def test_100_pushes_under_load_lose_nothing(ctl, learning, badnets_eval):
    dim = ServingSettings.read(learning.repository / "artifacts").latent_dim
    failures: list[Exception] = []
    mixed: list[list[int]] = []
    served = [0]
    stop = threading.Event()

    def client_loop(k: int) -> None:
        model = DEFENDED[k % len(DEFENDED)]
        with grpcclient.InferenceServerClient(learning.grpc) as c:
            while not stop.is_set():
                try:
                    versions = infer(c, badnets_eval.clean[k * 8 : k * 8 + 8], model)["DIRECTION_VERSION"].reshape(-1)
                except Exception as exc:
                    failures.append(exc)
                    continue
                served[0] += 1
                if len(set(versions.tolist())) != 1:
                    mixed.append(versions.tolist())

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        versions = [ctl.push([random_direction(dim, 100 + i, 0.01)])["version"] for i in range(100)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert mixed == []
    assert served[0] > 50
    assert versions == sorted(versions) and len(set(versions)) == 100


@pytest.mark.parametrize("case", ["no_token", "wrong_token", "nan", "wrong_shape", "oversized", "bad_alpha",
                                  "bad_images", "bad_images_sent", "too_many_images", "unknown_action",
                                  "bad_rollback"])
def test_rejected_actions_change_nothing(ctl, learning, case):
    dim = ServingSettings.read(learning.repository / "artifacts").latent_dim
    ctl.push([random_direction(dim, 7, 0.01)])
    before = store_snapshot(learning.repository)
    live = ctl.status()["version"]
    good = random_direction(dim, 8, 0.01)
    client = ctl
    if case in ("no_token", "wrong_token"):
        client = ControlClient(learning.grpc, "" if case == "no_token" else learning.token + "x")
    action, images, expected = {
        "no_token": (lambda c: c.push([good]), None, "permission denied"),
        "wrong_token": (lambda c: c.push([good]), None, "permission denied"),
        "nan": (lambda c: c.push([{**good, "beta": [float("nan")] * dim}]), None, "NaN"),
        "wrong_shape": (lambda c: c.push([{**good, "beta": good["beta"][:-1]}]), None, f"latent has {dim}"),
        "oversized": (lambda c: c.push([{**good, "beta": [0.01] * (dim * 4000)}]), None, "bytes"),
        "bad_alpha": (lambda c: c.push([{**good, "alpha": 1e9}]), None, "alpha"),
        # the client reads the shape from fire_control's config and refuses before sending (issue 26) ...
        "bad_images": (lambda c: c.observe(np.zeros((2, 8, 8, 3), np.uint8)), None,
                       "images are 8 x 8 x 3 (H x W x C) but this server's model takes 8 x 8 x 1"),
        # ... and the server refuses them when a client sends them anyway
        "bad_images_sent": (lambda c: c.call({"action": "observe", "clean": False}, np.zeros((2, 8, 8, 3), np.uint8)),
                            None, "unexpected shape for input"),
        # one request of 300 (the client would split them: 300 digits images are 19 KB)
        "too_many_images": (lambda c: c.observe(np.zeros((300, 8, 8, 1), np.uint8), chunk=300), None, "1 to 256"),
        "unknown_action": (lambda c: c.call({"action": "format-disk"}), None, "unknown action"),
        "bad_rollback": (lambda c: c.rollback(99999), None, "never committed"),
    }[case]
    with pytest.raises(FireClientError) as info:
        action(client)
    assert expected.lower() in str(info.value).lower(), str(info.value)
    assert learning.token not in str(info.value)
    assert ctl.status()["version"] == live
    assert store_snapshot(learning.repository) == before
    if client is not ctl:
        client.close()


def test_history_records_every_change_without_secrets(ctl, learning):
    history = ctl.history()["history"]
    assert history[-1]["action"] == "rollback" and history[-1]["live"] == 0
    assert all(e["actor"].startswith("tok-") or e["actor"] == "fire repo build" for e in history)
    text = (learning.repository / "artifacts" / "store" / "history.jsonl").read_text()
    assert learning.token not in text
    log = learning.server.log_path.read_text() if learning.server.log_path else ""
    assert learning.token not in log


def test_kill_9_mid_stream_restarts_on_a_committed_version(tmp_path, production, badnets_eval):
    repository = tmp_path / "repository"
    shutil.copytree(production, repository)
    dim = ServingSettings.read(repository / "artifacts").latent_dim
    token = "crash-test-token"
    acknowledged: list[int] = []
    with running_server(repository, extra_env=pinned_token(token)) as server:
        stop = threading.Event()

        def stream() -> None:
            with ControlClient(server.urls["grpc"], token, timeout_s=10) as c:
                i = 0
                while not stop.is_set():
                    try:
                        if i % 3 == 2:
                            acknowledged.append(c.observe(flagged_images(3))["version"])
                        else:
                            acknowledged.append(c.push([random_direction(dim, 1000 + i, 0.01)])["version"])
                    except Exception:
                        return
                    i += 1

        worker = threading.Thread(target=stream)
        worker.start()
        time.sleep(2.0)
        os.kill(server.pid, signal.SIGKILL)
        stop.set()
        worker.join(timeout=30)
    assert acknowledged, "no action was acknowledged before the kill"
    store = DirectionStore(repository / "artifacts" / "store")
    # Simulate a torn write as well: a partial, newer version file that was never committed.
    (store.versions_dir / f"{max(acknowledged) + 50:08d}.fire").write_bytes(b'{"magic": "x"}\n\x00\x01')
    with running_server(repository, extra_env=pinned_token(token)) as server:
        with grpcclient.InferenceServerClient(server.urls["grpc"]) as c:
            served = int(infer(c, badnets_eval.clean[:2])["DIRECTION_VERSION"][0, 0])
    history = store.history()
    committed = [e["live"] for e in history]
    assert served >= max(acknowledged)
    assert served == committed[-1]
    store.read_version(served)  # verifies the checksum
    assert json.loads(store.current_path.read_text())["version"] == served


FIRE = Path(sys.executable).with_name("fire")


def test_fire_ctl_status_marks_a_repair_instance_killed_with_kill_9_gone(tmp_path, production):
    """A stub killed outright cannot withdraw its registry entry; `fire ctl status` tells it from the live ones.
    (Its own server: the instance stays dead, as tritonserver does not restart it without `fire serve`.)"""
    repository = tmp_path / "repository"
    shutil.copytree(production, repository)
    token = "gone-test-token"
    with running_server(repository, extra_env=pinned_token(token)) as server, \
            ControlClient(server.urls["grpc"], token, timeout_s=10) as ctl:
        before = ctl.status()
        assert len(before["instances"]) == 2 and before["gone"] == []
        victim = before["instances"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while is_running(victim["pid"]):
            assert time.monotonic() < deadline, "the stub did not die"
            time.sleep(0.05)
        after = ctl.status()
        env = {**os.environ, "FIRE_CONTROL_TOKEN": token, "FIRE_CONTROL_TOKEN_FILE": ""}
        printed = subprocess.run([str(FIRE), "ctl", "--url", server.urls["grpc"], "status"], capture_output=True,
                                 text=True, env=env, timeout=120, check=True).stdout
    assert [g["instance"] for g in after["gone"]] == [victim["instance"]]
    assert [i["instance"] for i in after["instances"]] == [before["instances"][1]["instance"]]
    assert f"repair instance {victim['instance']}: GONE (pid {victim['pid']} no longer runs" in printed
    survivor = before["instances"][1]
    assert f"repair instance {survivor['instance']}: version {survivor['version']} (live" in printed


@pytest.mark.parametrize("argv", [["status", "--json"], ["--json", "status"], ["history", "--json"]],
                         ids=" ".join)
def test_fire_ctl_reads_the_token_file_variable_and_json_after_the_action(ctl, learning, tmp_path, argv):
    """`fire ctl` through the console script: FIRE_CONTROL_TOKEN_FILE is honoured (a wrong FIRE_CONTROL_TOKEN in
    the shell does not win), and --json works after the action as `fire ctl --help` shows."""
    token_file = tmp_path / "token"
    token_file.write_text(learning.token + "\n")
    token_file.chmod(0o600)
    env = {**os.environ, "FIRE_CONTROL_TOKEN_FILE": str(token_file), "FIRE_CONTROL_TOKEN": "wrong"}
    proc = subprocess.run([str(FIRE), "ctl", "--url", learning.grpc, *argv], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer == ctl.status() if "status" in argv else answer["history"] == ctl.history()["history"]


def test_fire_ctl_refusal_is_one_line_naming_the_server(learning):
    env = {**os.environ, "FIRE_CONTROL_TOKEN": "wrong", "FIRE_CONTROL_TOKEN_FILE": ""}
    proc = subprocess.run([str(FIRE), "ctl", "--url", learning.grpc, "rollback", "0"], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fire ctl: error:") and "permission denied" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
