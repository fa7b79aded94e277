"""Real tritonserver fixtures shared by the integration tests (one server per scenario per session)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fire_backend.serving.repository import build_repository
from fire_backend.serving.server import TritonServer, running_server
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


def _serve(tmp_path_factory, checkpoint: Path, name: str, flagged: int | None, **options) -> Iterator[Served]:
    repository = tmp_path_factory.mktemp(name) / "repository"
    build_repository(checkpoint, repository, flagged=flagged)
    token = secrets.token_urlsafe(16)
    with running_server(repository, extra_env=pinned_token(token), **options) as server:
        yield Served(server, repository, checkpoint, token)


@pytest.fixture(scope="session")
def defended(tmp_path_factory, digits_checkpoint: Callable[[str], Path]) -> Iterator[Served]:
    """BadNets digits model served with a direction estimated offline from 20 flagged samples; HTTP inference is
    open (the HTTP clients and Locust users are tested against it)."""
    yield from _serve(tmp_path_factory, digits_checkpoint("badnets"), "defended", flagged=20, http_inference=True)


@dataclass(frozen=True)
class Target:
    """A served checkpoint as clients address it (URLs with scheme, for FireClient and Locust --host)."""

    checkpoint: Path
    urls: dict


@pytest.fixture(scope="session")
def served(defended: Served) -> Target:
    return Target(defended.checkpoint, {"grpc": f"grpc://{defended.grpc}", "http": defended.server.urls["http"]})


@pytest.fixture(scope="session")
def learning(tmp_path_factory, digits_checkpoint: Callable[[str], Path]) -> Iterator[Served]:
    """BadNets digits model served with no direction yet (2 repair instances), for control tests."""
    yield from _serve(tmp_path_factory, digits_checkpoint("badnets"), "learning", flagged=None)
