"""The adversarial suite's servers: the production defaults of `fire serve`, supervised, on loopback.

One FIRE server (the digits BadNets model, a direction from 20 flagged samples) is shared by the tests of
``test_hardened.py``, which run in file order and leave the destructive ones (stub kill, server kill) for last;
``test_supervision.py`` uses a tiny one-stub model that starts in seconds. Every wait is bounded.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from probes import RESTART_BUDGET_S, Hardened

from fire_backend.launcher.health import HealthServer
from fire_backend.launcher.ports import free_ports
from fire_backend.launcher.server import ServerConfig, TritonServer
from fire_backend.launcher.supervisor import Supervisor
from fire_backend.repository.build import build_repository
from fire_backend.wire.token import pinned_token


@pytest.fixture(scope="session")
def hardened(tmp_path_factory: pytest.TempPathFactory,
             digits_checkpoint: Callable[[str], Path]) -> Iterator[Hardened]:
    repository = tmp_path_factory.mktemp("hardened") / "repository"
    build_repository(digits_checkpoint("badnets"), repository, flagged=20)
    token = secrets.token_urlsafe(24)
    http, grpc, metrics, health_port = free_ports(4)
    config = ServerConfig(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          extra_env=pinned_token(token))
    events: list[str] = []
    supervisor = Supervisor(TritonServer(config), report=events.append)
    health = HealthServer("127.0.0.1", health_port, supervisor.health).start()
    stop = threading.Event()
    supervisor.start()
    thread = threading.Thread(target=supervisor.run, args=(stop,), name="supervisor", daemon=True)
    thread.start()
    try:
        yield Hardened(supervisor, health, repository, token)
    finally:
        stop.set()
        thread.join(timeout=RESTART_BUDGET_S)
        supervisor.stop()
        supervisor.server.close()
        health.stop()
        assert not thread.is_alive(), "the supervisor did not stop"
