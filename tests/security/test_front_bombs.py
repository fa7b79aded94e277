"""Issue 24's HTTP findings against the production defaults of `fire serve` (the shared supervised server of
conftest.py): a 4 MiB form POST to every open port and every KServe v2 shape bomb, 100 of each in a row, are
answered 4xx by the HTTP front, and the same tritonserver process keeps serving. Bounded in time."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
from probes import Hardened

from fire_backend.wire.client import FireClient
from fire_backend.wire.names import FIRE_ENSEMBLE

pytestmark = [pytest.mark.security, pytest.mark.integration]

REPEATS = 100
#: the whole test's budget (about 10 s here on 2 busy cores)
BUDGET_S = 180.0
FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # curl --data-binary's default
JSON = {"Content-Type": "application/json"}
INFER = f"/v2/models/{FIRE_ENSEMBLE}/infer"


def inputs(shape: list[int], datatype: str = "FP32", data: list | None = None, **parameters: int) -> bytes:
    tensor: dict = {"name": "IMAGE", "shape": shape, "datatype": datatype}
    if parameters:
        tensor["parameters"] = parameters
    else:
        tensor["data"] = [0.0] * 64 if data is None else data
    return json.dumps({"inputs": [tensor]}).encode()


def binary(shape: list[int], size: int, raw: bytes) -> tuple[bytes, dict[str, str]]:
    header = inputs(shape, binary_data_size=size)
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def chunks(body: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


#: (name, body, headers, whether to send it chunked, expected status)
BOMBS = [
    ("2^40 claim (the issue's 417 bytes)", inputs([1, 1, 8, 2**40]), JSON, False, 400),
    ("2^31 dimension", inputs([1, 1, 8, 2**31]), JSON, False, 400),
    ("negative dimension", inputs([1, 1, -8, 8]), JSON, False, 400),
    ("huge batch", inputs([2**40, 1, 8, 8]), JSON, False, 400),
    ("batch over max_batch_size", inputs([65, 1, 8, 8]), JSON, False, 400),
    ("element count overflowing int64", inputs([2**62 + 1, 4, 2**62, 8]), JSON, False, 400),
    ("BYTES in the FP32 slot", inputs([1, 1, 8, 8], "BYTES", ["x" * 64] * 64), JSON, False, 400),
    ("strings as FP32 data", inputs([1, 1, 8, 8], data=["1e9999"] * 64), JSON, False, 400),
    ("binary_data_size past the body", *binary([1, 1, 8, 8], 2**40, bytes(256)), False, 400),
    ("binary_data_size short of the shape", *binary([1, 1, 8, 8], 4, bytes(4)), False, 400),
    ("2^40 claim with a matching binary_data_size", *binary([1, 1, 8, 2**40], 2**42, bytes(256)), False, 400),
    ("chunked 2^40 claim", inputs([1, 1, 8, 2**40]), JSON, True, 400),
    ("chunked body past the model's bound", b"[" + b"0.0," * (1 << 20) + b"0.0]", JSON, True, 413),
    ("deep JSON", b"[" * 100_000, JSON, False, 400),
    ("4 MiB body declared", b"x" * (4 << 20), JSON, False, 413),
]


def send(connection: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str],
         chunked: bool = False) -> int:
    if chunked:
        connection.request("POST", path, body=chunks(body), headers=headers, encode_chunked=True)
    else:
        connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    return response.status


def test_issue24_every_open_port_and_every_shape_bomb_gets_a_4xx_and_the_server_stays_up(hardened: Hardened) -> None:
    pid, began = hardened.server.pid, time.monotonic()
    died = sum("died" in message for _, message in hardened.supervisor.events)
    http_url, metrics_url = urlsplit(hardened.http), urlsplit(hardened.server.urls["metrics"])
    form = b"a" * (4 << 20)
    ports = {"http": (http_url.port, "/v2/health/ready", 405), "metrics": (metrics_url.port, "/metrics", 405),
             "health": (hardened.health.port, "/ready", 405)}
    for name, (port, path, status) in ports.items():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            codes = [send(connection, path, form, FORM) for _ in range(REPEATS)]
        finally:
            connection.close()
        assert codes == [status] * REPEATS, (name, set(codes))
    # gRPC (HTTP/2) is tritonserver's own: an HTTP/1.1 form POST there is dropped, and harms nothing
    with socket.create_connection(("127.0.0.1", int(hardened.grpc.rsplit(":", 1)[1])), timeout=30) as raw:
        raw.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                    b"Content-Length: 4194304\r\n\r\n")
        try:
            raw.sendall(form)
        except OSError:
            pass  # the HTTP/2 server closed the connection: what we expect
    connection = http.client.HTTPConnection("127.0.0.1", http_url.port, timeout=30)
    try:
        for name, body, headers, chunked, status in BOMBS:
            codes = [send(connection, INFER, body, headers, chunked) for _ in range(REPEATS)]
            assert codes == [status] * REPEATS, (name, set(codes))
            assert hardened.server.pid == pid and hardened.server.is_alive(), name
    finally:
        connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", http_url.port, timeout=30)
    try:  # well-formed requests still pass, chunked or not, JSON or binary
        images = np.random.default_rng(1).random((2, 1, 8, 8)).astype(np.float32)
        good_json = inputs([2, 1, 8, 8], data=images.ravel().tolist())
        good_binary = binary([2, 1, 8, 8], images.nbytes, images.tobytes())
        assert send(connection, INFER, good_json, JSON) == 200
        assert send(connection, INFER, good_json, JSON, chunked=True) == 200
        assert send(connection, INFER, *good_binary) == 200
        assert send(connection, INFER, *good_binary, chunked=True) == 200
    finally:
        connection.close()
    elapsed = time.monotonic() - began
    print(f"{len(ports) * REPEATS} form POSTs and {len(BOMBS) * REPEATS} bombs answered in {elapsed:.1f} s")
    assert elapsed < BUDGET_S
    assert hardened.server.pid == pid and hardened.server.is_alive() and hardened.ready() == 200
    assert sum("died" in message for _, message in hardened.supervisor.events) == died
    with FireClient(hardened.http) as client:  # HTTP inference, through the front, still right
        images = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
        over_http = client.infer(images)
    with FireClient(f"grpc://{hardened.grpc}") as client:
        np.testing.assert_array_equal(over_http.labels, client.infer(images).labels)
