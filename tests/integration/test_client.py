"""fire_backend.wire.client and `fire infer` against the real tritonserver (gRPC and HTTP).

The server: a repository built with --flagged 20 (FIRE has a direction from the start), the session's `defended`
server when tests/integration/conftest.py provides it, else one for this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fire_backend.cli import main as fire_main
from fire_backend.wire.client import FireClient
from fire_backend.wire.endpoints import parse_url
from fire_backend.wire.errors import FireClientError, ServerUnreachable
from fire_backend.wire.images import load_digits, load_npz, to_model_input
from fire_backend.wire.token import TOKEN_ENV, TOKEN_FILE_ENV

N_IMAGES = 12
integration = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(badnets_checkpoint) -> Path:
    return badnets_checkpoint


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory) -> dict[str, Path]:
    """clean.npz and poisoned.npz written by `fire data export`."""
    out = tmp_path_factory.mktemp("client-data")
    paths = {"clean": out / "clean.npz", "poisoned": out / "poisoned.npz"}
    for kind, path in paths.items():
        argv = ["data", "export", "--checkpoint", str(checkpoint), "--split", "test", "--n", str(N_IMAGES),
                "--out", str(path)] + (["--poisoned"] if kind == "poisoned" else [])
        assert fire_main(argv) == 0
    return paths


def offline_labels(checkpoint: Path, x_uint8: np.ndarray) -> np.ndarray:
    import torch

    from fire_backend.data import to_tensor
    from fire_backend.offline.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    model.eval()
    with torch.no_grad():
        return model(to_tensor(x_uint8)).argmax(1).numpy()


def run_infer(capsys, argv: list[str]) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = fire_main(["infer", *argv])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    payload = json.loads(lines[-1]) if code == 0 and "--json" in argv else None
    return code, payload, captured.err


# --------------------------------------------------------------------------------------------------
# no server
# --------------------------------------------------------------------------------------------------


def test_parse_url_forms():
    assert parse_url("grpc://127.0.0.1:8001").url == "grpc://127.0.0.1:8001"
    assert parse_url("http://localhost:9000").address == "localhost:9000"
    assert parse_url("127.0.0.1:9001").protocol == "grpc"
    assert parse_url("127.0.0.1", protocol="http").port == 8000
    for bad, protocol in (("https://h:1", None), ("ftp://h:1", None), ("h:notaport", None), ("grpc://h:1", "http")):
        with pytest.raises(FireClientError):
            parse_url(bad, protocol)


def test_conversion_matches_the_library():
    from fire_backend.data import load_dataset, to_tensor
    from fire_backend.defaults import evaluation_indices

    data = load_dataset("digits")
    digits = load_digits()
    evaluated = evaluation_indices(data.y_test)  # same split as the training code: the reserve left out
    np.testing.assert_array_equal(digits.x, data.x_test[evaluated])
    np.testing.assert_array_equal(digits.y, data.y_test[evaluated])
    x = to_model_input(digits.x[:5])
    assert x.dtype == np.float32 and x.shape == (5, 1, 8, 8)
    np.testing.assert_allclose(x, to_tensor(digits.x[:5].copy()).numpy(), atol=1e-7)
    np.testing.assert_array_equal(to_model_input(x), x)  # float NCHW passes through
    with pytest.raises(ValueError):
        to_model_input(x * 2)  # outside [0, 1]


# --------------------------------------------------------------------------------------------------
# real server
# --------------------------------------------------------------------------------------------------


@integration
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_fire_infer_labels_match_offline_model(served, checkpoint, exported, capsys, protocol):
    clean = load_npz(exported["clean"])
    expected = offline_labels(checkpoint, clean.x)
    code, payload, err = run_infer(capsys, ["--url", served.urls[protocol], "--npz", str(exported["clean"]),
                                            "--batch", "5", "--json"])
    assert code == 0, err
    assert payload["n"] == N_IMAGES and payload["requests"] == 3
    labels = [r["label"] for r in payload["results"]]
    assert labels == expected.tolist()
    assert all(r["version"] == 1 for r in payload["results"])  # the --flagged 20 direction
    assert not any(r["flagged"] for r in payload["results"])  # clean images are not flagged

    for model in ("undefended_ensemble", "fire_monolithic"):
        code, payload, err = run_infer(capsys, ["--url", served.urls[protocol], "--npz", str(exported["clean"]),
                                                "--model", model, "--json"])
        assert code == 0, err
        assert [r["label"] for r in payload["results"]] == expected.tolist()
        assert "flagged" not in payload["results"][0]


@integration
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bypass_skips_the_repair(served, checkpoint, exported, capsys, protocol, monkeypatch):
    poisoned = load_npz(exported["poisoned"])
    attacked = offline_labels(checkpoint, poisoned.x)
    assert (attacked == 0).mean() >= 0.9  # the backdoor works offline
    url = served.urls[protocol]
    monkeypatch.setenv(TOKEN_FILE_ENV, "")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    code, _, err = run_infer(capsys, ["--url", url, "--npz", str(exported["poisoned"]), "--bypass"])
    assert code == 2 and "signed with the control token" in err  # no token: not even sent
    monkeypatch.setenv(TOKEN_ENV, "a-guess")
    code, _, err = run_infer(capsys, ["--url", url, "--npz", str(exported["poisoned"]), "--bypass"])
    assert code == 2 and "wrong control token" in err
    monkeypatch.setenv(TOKEN_ENV, served.token)
    code, bypassed, err = run_infer(capsys, ["--url", url, "--npz", str(exported["poisoned"]), "--bypass", "--json"])
    assert code == 0, err
    assert [r["label"] for r in bypassed["results"]] == attacked.tolist()
    code, repaired, err = run_infer(capsys, ["--url", url, "--npz", str(exported["poisoned"]), "--batch", "64",
                                             "--json"])
    assert code == 0, err
    assert repaired["accuracy"] >= 0.9  # PA: true labels back
    assert repaired["flagged_rate"] >= 0.9


@integration
def test_client_result_fields(served, exported):
    x = load_npz(exported["poisoned"]).x
    for protocol in ("grpc", "http"):
        with FireClient(served.urls[protocol]) as client:
            fire = client.infer(x)
            assert fire.labels.shape == (N_IMAGES,) and fire.logits.shape == (N_IMAGES, 10)
            assert fire.flagged.dtype == bool and fire.scores.dtype == np.float32
            assert set(fire.versions.tolist()) == {1}
            plain = client.infer(to_model_input(x), model="undefended_ensemble")
            assert plain.flagged is None and plain.scores is None and plain.versions is None
            asked = client.infer(x, outputs=("FLAGGED",))  # what Locust asks for: LABEL comes too
            assert np.array_equal(asked.labels, fire.labels) and np.array_equal(asked.flagged, fire.flagged)
            assert asked.logits is None and asked.scores is None and asked.versions is None
            with pytest.raises(FireClientError, match="not loaded"):
                client.infer(x, model="no_such_model")
            with pytest.raises(FireClientError, match="at most 64"):
                client.infer(np.repeat(x, 6, axis=0))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_names_the_fix(capsys, protocol):
    from fire_backend.launcher.ports import free_port

    port = free_port()
    code, _, err = run_infer(capsys, ["--url", f"{protocol}://127.0.0.1:{port}", "--digits", "2"])
    assert code == 2
    assert f"cannot reach 127.0.0.1:{port}: is `fire serve` running? pass --url" in err
    with pytest.raises(ServerUnreachable):
        with FireClient(f"127.0.0.1:{port}", protocol) as client:
            client.infer(load_digits(1).x)
