"""FIRE on the real tritonserver, every layout from one server: exactness, bypass, batching, validation,
lifecycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import DEFENDED, bypass_parameters, infer, labels
from tritonclient.utils import InferenceServerException

from fire_backend.fire import compile_directions, repair
from fire_backend.launcher.ports import free_ports
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.repository.layout import ServingSettings
from fire_backend.stores.files import DirectionStore
from fire_backend.wire.control import ControlClient
from fire_backend.wire.errors import FireClientError
from fire_backend.wire.names import (
    BYPASS_PARAMETER,
    CREDENTIAL_PARAMETER,
    FIRE_CONTROL,
    FIRE_ENSEMBLE,
    FIRE_MONOLITHIC,
    UNDEFENDED_ENSEMBLE,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["grpc", "http"])
def client(request, defended):
    if request.param == "grpc":
        c = grpcclient.InferenceServerClient(defended.grpc)
    else:
        c = httpclient.InferenceServerClient(defended.http, concurrency=4)
    yield c
    c.close()


def test_bypassed_and_baseline_logits_equal_offline_model(client, defended, badnets_eval):
    model, _ = load_checkpoint(defended.checkpoint)
    images = np.concatenate([badnets_eval.clean[:32], badnets_eval.poisoned[:32]])
    with torch.inference_mode():
        expected = model(torch.from_numpy(images)).numpy()
    for name in (*DEFENDED, UNDEFENDED_ENSEMBLE, FIRE_MONOLITHIC):
        out = infer(client, images, name, bypass=defended.token if name in DEFENDED else None)
        assert np.abs(out["LOGITS"] - expected).max() < 1e-4, name
        assert (out["LABEL"].reshape(-1) == expected.argmax(1)).all()


def test_a_client_asking_only_for_label_gets_only_label(client, defended, badnets_eval):
    """Every defended layout and the baselines: a response holds what the request named (the stages build nothing
    else: tests/unit/test_stages.py), and every output when it named none."""
    images = badnets_eval.poisoned[:4]
    for name in (*DEFENDED, UNDEFENDED_ENSEMBLE, FIRE_MONOLITHIC):
        everything = infer(client, images, name)
        only = infer(client, images, name, outputs=["LABEL"])
        assert list(only) == ["LABEL"], name
        assert np.array_equal(only["LABEL"], everything["LABEL"]), name
    assert {"LOGITS", "LABEL", "REPAIR_SCORE", "FLAGGED", "DIRECTION_VERSION"} <= set(infer(client, images))


@pytest.mark.parametrize("model", DEFENDED)
def test_served_fire_equals_offline_fire(client, defended, badnets_eval, model):
    """Same samples, same store version, same FIRE function: same predictions and CA/PA/ASR, in every layout."""
    net, _ = load_checkpoint(defended.checkpoint)
    settings = ServingSettings.read(defended.repository / "artifacts")
    version = DirectionStore(defended.repository / "artifacts" / "store").read_version(1)
    compiled = compile_directions(version.directions.directions, torch.from_numpy(version.directions.center),
                                  settings.latent_dim)
    head, tail = net.cut(settings.layer)

    def offline(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            fixed, _, _ = repair(head(torch.from_numpy(images)), compiled)
            return tail(fixed).argmax(1).numpy()

    ev = badnets_eval
    served_clean, served_poison = labels(client, ev.clean, model), labels(client, ev.poisoned, model)
    offline_clean, offline_poison = offline(ev.clean), offline(ev.poisoned)
    assert (served_clean == offline_clean).all()
    assert (served_poison == offline_poison).all()
    pa = (served_poison == ev.poisoned_labels).mean()
    asr = (served_poison == ev.target).mean()
    ca, offline_ca = (served_clean == ev.labels).mean(), (offline_clean == ev.labels).mean()
    assert ca == offline_ca and pa >= 0.9 and asr <= 0.05
    out = infer(client, ev.poisoned[:16], model)
    assert out["DIRECTION_VERSION"].reshape(-1).tolist() == [1] * 16
    assert out["FLAGGED"].all() and (out["REPAIR_SCORE"] > 0.5).all()
    clean_out = infer(client, ev.clean[:64], model)
    assert clean_out["FLAGGED"].mean() < 0.1


@pytest.mark.parametrize("model", DEFENDED)
def test_signed_bypass_restores_the_backdoor_and_an_unsigned_one_is_refused(defended, badnets_eval, model):
    x = badnets_eval.poisoned[:64]
    with grpcclient.InferenceServerClient(defended.grpc) as c:
        bypassed = labels(c, x, model, bypass=defended.token)
        repaired = labels(c, x, model)
        shadow = infer(c, x, model, bypass=defended.token)
        for parameters, expected in (({BYPASS_PARAMETER: True}, CREDENTIAL_PARAMETER),
                                     ({BYPASS_PARAMETER: "true"}, "JSON boolean"),
                                     (bypass_parameters(x[:1], defended.token), "wrong control token"),
                                     (bypass_parameters(x, "not-the-token"), "wrong control token")):
            with pytest.raises(InferenceServerException, match=expected):
                infer(c, x, model, parameters=parameters)
    assert (bypassed == badnets_eval.target).mean() >= 0.9
    assert (repaired == badnets_eval.poisoned_labels[:64]).mean() >= 0.9
    assert shadow["FLAGGED"].mean() >= 0.9  # bypassed requests are still scored (shadow mode)


def test_dynamic_batching_forms_batches_in_every_layout(defended, badnets_eval):
    stop = time.monotonic() + 3.0
    errors: list[Exception] = []

    def worker(offset: int) -> None:
        model = DEFENDED[offset % len(DEFENDED)]
        with grpcclient.InferenceServerClient(defended.grpc) as c:
            i = offset
            while time.monotonic() < stop:
                try:
                    infer(c, badnets_eval.clean[i % 300 : i % 300 + 1], model)
                except Exception as exc:  # collected and asserted below
                    errors.append(exc)
                i += 1

    threads = [threading.Thread(target=worker, args=(k * 17,)) for k in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with grpcclient.InferenceServerClient(defended.grpc) as c:
        for model in (FIRE_ENSEMBLE, "fire_inline_head", "fire_inline_tail", "fire_separate_head",
                      "fire_separate_tail"):
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
    stop = time.monotonic() + 2.0
    results: list[bool] = []

    def good_traffic(model: str) -> None:
        with grpcclient.InferenceServerClient(defended.grpc) as c:
            while time.monotonic() < stop:
                results.append(infer(c, good, model)["LABEL"].shape == (4, 1))

    threads = [threading.Thread(target=good_traffic, args=(model,)) for model in DEFENDED]
    for t in threads:
        t.start()
    messages = []
    with grpcclient.InferenceServerClient(defended.grpc) as c:
        while time.monotonic() < stop - 0.3:
            for model in DEFENDED:
                with pytest.raises(InferenceServerException) as info:
                    infer(c, bad[0], model, dtype=bad[1])
                messages.append(str(info.value))
    for t in threads:
        t.join()
    assert results and all(results), "a good request failed next to a bad one"
    expected = {"shape": "shape", "dtype": "data-type", "nan": "NaN", "inf": "Inf", "range": "[0, 1]",
                "empty": "", "too_big": "batch"}[case]
    for message in messages[:len(DEFENDED)]:
        assert expected.lower() in message.lower(), message


def _stage_processes(repository: Path) -> set[int]:
    """tritonserver and stub processes serving ``repository`` (others on a shared machine are not ours)."""
    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if (p.info["name"] in ("tritonserver", "triton_python_backend_stub")
                or "triton_python_backend_stub" in cmdline) and str(repository) in cmdline:
            found.add(p.pid)
    return found


def _tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its modification time (ns): what tritonserver's poll mode compares."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in [root, *root.rglob("*")]}


def test_fire_serve_starts_fast_and_ctrl_c_leaves_nothing(production, badnets_eval, tmp_path):
    """`fire serve` on a production repository (fused, no baselines, bypass not allowed)."""
    before = _stage_processes(production)
    http, grpc, metrics, health = free_ports(4)
    for name in ("a", "b"):
        (tmp_path / name).write_text(f"token-{name}\n")
        (tmp_path / name).chmod(0o600)
    # --token-file wins over the shell's FIRE_CONTROL_TOKEN_FILE, in the stubs too
    env = {**os.environ, "FIRE_CONTROL_TOKEN_FILE": str(tmp_path / "b"), "FIRE_CONTROL_TOKEN": "token-env"}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fire_backend.cli", "serve", "--repository", str(production),
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
        served_tree = _tree(production / "models")
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}") as c:
            assert c.is_server_ready()
            assert c.is_model_ready(FIRE_ENSEMBLE) and c.is_model_ready(FIRE_CONTROL)
            for undefended in (UNDEFENDED_ENSEMBLE, FIRE_MONOLITHIC, "fire_head", "fire_tail"):
                with pytest.raises(InferenceServerException):  # no model without the defence is served
                    c.get_model_metadata(undefended)
            x = badnets_eval.poisoned[:8]
            with pytest.raises(InferenceServerException, match="--allow-bypass"):
                infer(c, x, bypass="token-a")  # even signed with the right token
            assert (infer(c, x)["LABEL"].reshape(-1) == badnets_eval.poisoned_labels[:8]).mean() >= 0.75
        with ControlClient(f"127.0.0.1:{grpc}", "token-a") as ctl:
            assert ctl.status()["latent_shape"]  # the token from --token-file is the one the stubs hold
        for wrong in ("token-b", "token-env"):
            with ControlClient(f"127.0.0.1:{grpc}", wrong) as ctl, pytest.raises(FireClientError, match="denied"):
                ctl.status()
        # Serving writes nothing into the served tree: a written file (a stub's __pycache__) makes tritonserver
        # in poll mode reload the model under traffic (test_server_unit.py: a second start writes nothing either).
        assert _tree(production / "models") == served_tree
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
    assert _stage_processes(production) <= before
