"""The FIRE ensemble on the real tritonserver: exactness, batching, validation, lifecycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import infer, labels
from tritonclient.utils import InferenceServerException

from fire_backend.checkpoint import load_checkpoint
from fire_backend.fire import compile_directions, repair
from fire_backend.serving.artifacts import ServingSettings
from fire_backend.serving.ports import free_ports
from fire_backend.split import split
from fire_backend.store import DirectionStore
from fire_backend.wire.control import ControlClient
from fire_backend.wire.errors import FireClientError

pytestmark = pytest.mark.integration


@pytest.fixture(params=["grpc", "http"])
def client(request, defended):
    if request.param == "grpc":
        c = grpcclient.InferenceServerClient(defended.grpc)
    else:
        c = httpclient.InferenceServerClient(defended.http, concurrency=4)
    yield c
    c.close()


def test_bypassed_logits_equal_offline_model(client, defended, badnets_eval):
    model, _ = load_checkpoint(defended.checkpoint)
    images = np.concatenate([badnets_eval.clean[:32], badnets_eval.poisoned[:32]])
    with torch.inference_mode():
        expected = model(torch.from_numpy(images)).numpy()
    for name in ("fire_ensemble", "undefended_ensemble", "fire_monolithic"):
        out = infer(client, images, name, bypass=name == "fire_ensemble")
        assert np.abs(out["LOGITS"] - expected).max() < 1e-4, name
        assert (out["LABEL"].reshape(-1) == expected.argmax(1)).all()


def test_served_fire_equals_offline_fire(client, defended, badnets_eval):
    """Same samples, same store version, same FIRE function: same predictions and CA/PA/ASR."""
    model, _ = load_checkpoint(defended.checkpoint)
    settings = ServingSettings.read(defended.repository / "artifacts")
    version = DirectionStore(defended.repository / "artifacts" / "store").read_version(1)
    compiled = compile_directions(version.directions.directions, torch.from_numpy(version.directions.center),
                                  settings.latent_dim)
    head, tail = split(model, settings.layer)

    def offline(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            fixed, _, _ = repair(head(torch.from_numpy(images)), compiled)
            return tail(fixed).argmax(1).numpy()

    ev = badnets_eval
    served_clean, served_poison = labels(client, ev.clean), labels(client, ev.poisoned)
    offline_clean, offline_poison = offline(ev.clean), offline(ev.poisoned)
    assert (served_clean == offline_clean).all()
    assert (served_poison == offline_poison).all()
    pa = (served_poison == ev.poisoned_labels).mean()
    asr = (served_poison == ev.target).mean()
    ca, offline_ca = (served_clean == ev.labels).mean(), (offline_clean == ev.labels).mean()
    assert ca == offline_ca and pa >= 0.9 and asr <= 0.05
    out = infer(client, ev.poisoned[:16])
    assert out["DIRECTION_VERSION"].reshape(-1).tolist() == [1] * 16
    assert out["FLAGGED"].all() and (out["REPAIR_SCORE"] > 0.5).all()
    clean_out = infer(client, ev.clean[:64])
    assert clean_out["FLAGGED"].mean() < 0.1


def test_bypass_restores_the_backdoor(defended, badnets_eval):
    with grpcclient.InferenceServerClient(defended.grpc) as c:
        bypassed = labels(c, badnets_eval.poisoned[:64], bypass=True)
        repaired = labels(c, badnets_eval.poisoned[:64])
    assert (bypassed == badnets_eval.target).mean() >= 0.9
    assert (repaired == badnets_eval.poisoned_labels[:64]).mean() >= 0.9


def test_dynamic_batching_forms_batches_on_head_and_tail(defended, badnets_eval):
    stop = time.monotonic() + 3.0
    errors: list[Exception] = []

    def worker(offset: int) -> None:
        with grpcclient.InferenceServerClient(defended.grpc) as c:
            i = offset
            while time.monotonic() < stop:
                try:
                    infer(c, badnets_eval.clean[i % 300 : i % 300 + 1])
                except Exception as exc:  # collected and asserted below
                    errors.append(exc)
                i += 1

    threads = [threading.Thread(target=worker, args=(k * 17,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with grpcclient.InferenceServerClient(defended.grpc) as c:
        for model in ("fire_head", "fire_tail"):
            stats = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
            sizes = [int(b["batch_size"]) for b in stats.get("batch_stats", [])]
            assert max(sizes) > 1, f"{model} only ran batches of {sizes}"


@pytest.mark.parametrize("case", ["shape", "dtype", "nan", "inf", "range", "empty", "too_big"])
def test_bad_requests_fail_alone(defended, badnets_eval, case):
    good = badnets_eval.clean[:4]
    bad = {
        "shape": (np.zeros((2, 1, 8, 9), np.float32), "FP32"),
        "dtype": (np.zeros((2, 1, 8, 8), np.float64), "FP64"),
        "nan": (np.where(np.arange(64).reshape(1, 1, 8, 8) == 5, np.nan, good[:1]).astype(np.float32), "FP32"),
        "inf": (np.full((1, 1, 8, 8), np.inf, np.float32), "FP32"),
        "range": (np.full((1, 1, 8, 8), 3.0, np.float32), "FP32"),
        "empty": (np.zeros((0, 1, 8, 8), np.float32), "FP32"),
        "too_big": (np.zeros((65, 1, 8, 8), np.float32), "FP32"),
    }[case]
    stop = time.monotonic() + 1.5
    results: list[bool] = []

    def good_traffic() -> None:
        with grpcclient.InferenceServerClient(defended.grpc) as c:
            while time.monotonic() < stop:
                results.append(infer(c, good)["LABEL"].shape == (4, 1))

    threads = [threading.Thread(target=good_traffic) for _ in range(4)]
    for t in threads:
        t.start()
    messages = []
    with grpcclient.InferenceServerClient(defended.grpc) as c:
        while time.monotonic() < stop - 0.3:
            with pytest.raises(InferenceServerException) as info:
                infer(c, bad[0], dtype=bad[1])
            messages.append(str(info.value))
    for t in threads:
        t.join()
    assert results and all(results), "a good request failed next to a bad one"
    expected = {"shape": "shape", "dtype": "data-type", "nan": "NaN", "inf": "Inf", "range": "[0, 1]",
                "empty": "", "too_big": "batch"}[case]
    assert expected.lower() in messages[0].lower(), messages[0]


def _stage_processes(repository) -> set[int]:
    """Server and stub processes serving ``repository`` (other servers on a shared machine do not count)."""
    return {p.pid for p in psutil.process_iter(["name", "cmdline"])
            if (p.info["name"] in ("tritonserver", "triton_python_backend_stub")
                or any("triton_python_backend_stub" in part for part in (p.info["cmdline"] or [])))
            and any(str(repository) in part for part in (p.info["cmdline"] or []))}


def test_fire_serve_starts_fast_and_ctrl_c_leaves_nothing(defended, tmp_path):
    before = _stage_processes(defended.repository)
    http, grpc, metrics, health = free_ports(4)
    for name in ("a", "b"):
        (tmp_path / name).write_text(f"token-{name}\n")
        (tmp_path / name).chmod(0o600)
    # --token-file wins over the shell's FIRE_CONTROL_TOKEN_FILE, in the stubs too
    env = {**os.environ, "FIRE_CONTROL_TOKEN_FILE": str(tmp_path / "b"), "FIRE_CONTROL_TOKEN": "token-env"}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fire_backend.cli", "serve", "--repository", str(defended.repository),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--health-port", str(health), "--token-file", str(tmp_path / "a")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("grpc:"):
                break
        ready = time.monotonic() - start
        assert any(line.startswith("grpc:") for line in lines), "".join(lines)
        assert ready < 60, f"start to ready took {ready:.1f}s"
        assert f"127.0.0.1:{grpc}" in "".join(lines)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}") as c:
            assert c.is_server_ready()
        with ControlClient(f"127.0.0.1:{grpc}", "token-a") as ctl:
            assert ctl.status()["latent_shape"]  # the token from --token-file is the one the stubs hold
        for wrong in ("token-b", "token-env"):
            with ControlClient(f"127.0.0.1:{grpc}", wrong) as ctl, pytest.raises(FireClientError, match="denied"):
                ctl.status()
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert children
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (children & {p.pid for p in psutil.process_iter()}):
        time.sleep(0.2)
    alive = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {alive}"
    assert _stage_processes(defended.repository) <= before
