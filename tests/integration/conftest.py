"""Real tritonserver fixtures shared by the integration tests: one server for every layout, per session."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import EVERY_LAYOUT

from fire_backend.launcher.server import TritonServer, running_server
from fire_backend.repository.build import build_repository
from fire_backend.stores.etcd.local import LocalEtcd, etcd_binary
from fire_backend.wire.control import ControlClient
from fire_backend.wire.token import pinned_token


@dataclass
class Served:
    server: TritonServer
    repository: Path
    checkpoint: Path
    token: str

    @property
    def grpc(self) -> str:
        return self.server.urls["grpc"]

    @property
    def http(self) -> str:
        return self.server.urls["http"].removeprefix("http://")


def _serve(repository: Path, checkpoint: Path, **options) -> Iterator[Served]:
    token = secrets.token_urlsafe(16)
    with running_server(repository, extra_env=pinned_token(token), **options) as server:
        yield Served(server, repository, checkpoint, token)


@pytest.fixture(scope="session")
def layouts(tmp_path_factory, digits_checkpoint: Callable[[str], Path]) -> Iterator[Served]:
    """ONE server for the session: the BadNets digits model served in every layout (fire_ensemble fused,
    fire_inline, fire_separate with 2 repair instances), undefended_ensemble and fire_monolithic; the store's
    version 1 is an offline estimate from 20 flagged reserve samples. Tests roll back to the version they need.
    HTTP inference goes through the HTTP front, as `fire serve` serves it (the HTTP clients and Locust users are
    tested against it)."""
    checkpoint = digits_checkpoint("badnets")
    repository = tmp_path_factory.mktemp("layouts") / "repository"
    build_repository(checkpoint, repository, flagged=20, options=EVERY_LAYOUT)
    yield from _serve(repository, checkpoint)


def live_version(served: Served, version: int) -> Served:
    with ControlClient(served.grpc, served.token) as ctl:
        if ctl.status()["version"] != version:
            ctl.rollback(version)
    time.sleep(0.15)  # every instance applies a committed version from its next batch; give idle ones a poll
    return served


@pytest.fixture
def defended(layouts: Served) -> Served:
    """The session server with the offline estimate (version 1) live."""
    return live_version(layouts, 1)


@pytest.fixture
def learning(layouts: Served) -> Served:
    """The session server, for control tests (which start from the version they need)."""
    return layouts


@dataclass(frozen=True)
class Target:
    """A served checkpoint as clients address it (URLs with scheme, for FireClient and Locust --host)."""

    checkpoint: Path
    urls: dict
    token: str


@pytest.fixture
def served(defended: Served) -> Target:
    return Target(defended.checkpoint, {"grpc": f"grpc://{defended.grpc}", "http": defended.server.urls["http"]},
                  defended.token)


@pytest.fixture(scope="session")
def badnets_checkpoint(digits_checkpoint: Callable[[str], Path]) -> Path:
    return digits_checkpoint("badnets")


@pytest.fixture(scope="session")
def production(tmp_path_factory, badnets_checkpoint: Path) -> Path:
    """A one-layer production repository as `fire repo build --layer block2 --flagged 20` writes it (fused; no
    baselines, no bypass; `fire bench` compares every layout of it, ``separate`` included); not served here: tests
    start their own server or `fire serve` on it."""
    repository = tmp_path_factory.mktemp("production") / "repository"
    build_repository(badnets_checkpoint, repository, "block2", flagged=20)
    return repository


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[LocalEtcd]:
    """A real single-member etcd on free loopback ports (never 2379), killed at the end of the test."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server; CI installs it)")
    engine = LocalEtcd(tmp_path / "etcd" / "data")
    engine.start()
    yield engine
    engine.stop(kill=True)


@pytest.fixture(scope="session")
def layered(tmp_path_factory, badnets_checkpoint: Path) -> Iterator[Served]:
    """ONE server for the session's several-layer tests: the default configuration, as `fire repo build` writes it
    with no layer and no attack named (block1 + block2, fused), starting at version 0 (to be learned online).
    Tests roll back to the version they need."""
    repository = tmp_path_factory.mktemp("layered") / "repository"
    build_repository(badnets_checkpoint, repository)
    yield from _serve(repository, badnets_checkpoint)
