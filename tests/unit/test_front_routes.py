"""The HTTP front's routing and refusals that need no tritonserver (its upstream socket does not exist here): what a
client gets for wrong methods, types, paths and bodies, and a 503 while tritonserver is away. Against the real
server: tests/security/test_front_bombs.py."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fire_backend.front.proxy import BindError, Front, Upstream
from fire_backend.launcher.ports import free_ports

FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # curl --data-binary's default


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    http, metrics = free_ports(2)
    missing = f"unix:{tmp_path / 'absent.sock'}"
    front = Front("127.0.0.1", http, metrics, Upstream(missing, missing)).open()
    yield front
    front.stop()


def ask(port: int, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else {})
    finally:
        connection.close()


def test_a_4_mib_form_post_is_answered_4xx_on_every_route(front: Front) -> None:
    body = b"a" * (4 << 20)
    http, metrics = front.ports["http"], front.ports["metrics"]
    for port, path, status in [(http, "/v2/health/ready", 405), (http, "/v2/models/fire_ensemble/infer", 415),
                               (http, "/", 404), (http, "/v2/repository/index", 403), (metrics, "/metrics", 405),
                               (metrics, "/", 404)]:
        for _ in range(3):  # the connection stays usable: the refused body was read and discarded
            code, answer = ask(port, "POST", path, body, FORM)
            assert code == status and answer["error"], (path, answer)


def test_every_refusal_says_what_to_send(front: Front) -> None:
    http = front.ports["http"]
    assert ask(http, "GET", "/v2/health/ready", b"x" * 10)[0] == 413  # a GET carries no body
    assert ask(http, "DELETE", "/v2/models/fire_ensemble")[0] == 405
    assert ask(http, "GET", "/v2/models/fire_ensemble/infer")[0] == 405
    assert ask(http, "GET", "/v2/models/%2e%2e/config")[0] == 404  # encoded paths match nothing
    code, answer = ask(http, "POST", "/v2/logging", b"{}", {"Content-Type": "application/json"})
    assert code == 403 and "restricted" in answer["error"]
    code, answer = ask(http, "POST", "/v2/models/fire_ensemble/infer", b"{}",
                       {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert code == 415 and "compressed" in answer["error"]
    code, answer = ask(http, "POST", "/v2/models/fire_ensemble/infer", b"{}",
                       {"Inference-Header-Content-Length": "-5"})
    assert code == 400 and "byte count" in answer["error"]


def test_tritonserver_away_is_a_503_not_a_refused_connection(front: Front) -> None:
    for port, path in [(front.ports["http"], "/v2/health/ready"), (front.ports["metrics"], "/metrics")]:
        code, answer = ask(port, "GET", path)
        assert code == 503 and "retry" in answer["error"]
    code, _ = ask(front.ports["http"], "POST", "/v2/models/fire_ensemble/infer", b"{}",
                  {"Content-Type": "application/json"})
    assert code == 503  # the model's config cannot be read: nothing is forwarded


def test_http_inference_can_be_closed(tmp_path: Path) -> None:
    missing = f"unix:{tmp_path / 'absent.sock'}"
    front = Front("127.0.0.1", 0, 0, Upstream(missing, missing), http_inference=False).open()
    try:
        code, answer = ask(front.ports["http"], "POST", "/v2/models/fire_ensemble/infer", b"{}",
                           {"Content-Type": "application/json"})
        assert code == 403 and "--no-http-inference" in answer["error"]
    finally:
        front.stop()


def test_a_taken_port_is_named_and_nothing_stays_open(tmp_path: Path) -> None:
    http, metrics = free_ports(2)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", metrics))
        blocker.listen()
        with pytest.raises(BindError) as info:
            Front("127.0.0.1", http, metrics, Upstream("unix:/nowhere", "unix:/nowhere")).open()
    assert (info.value.what, info.value.port) == ("metrics", metrics)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", http)) != 0
