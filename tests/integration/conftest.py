"""Real tritonserver fixtures shared by the integration tests (one server per scenario per session)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fire_backend.data import load_dataset, resolve_attack, to_tensor
from fire_backend.defaults import evaluation_indices
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


@dataclass
class EvalImages:
    """The evaluation images of the digits test split (the defender's reserve excluded)."""

    clean: np.ndarray  # float32 NCHW
    labels: np.ndarray
    poisoned: np.ndarray  # non-target images with the trigger
    poisoned_labels: np.ndarray  # their true labels
    target: int


@pytest.fixture(scope="session")
def badnets_eval() -> EvalImages:
    data = load_dataset("digits")
    evaluated = evaluation_indices(data.y_test)
    x, y = to_tensor(data.x_test[evaluated]), data.y_test[evaluated]
    keep = y != 0
    poisoned = resolve_attack("badnets")(x[keep])
    return EvalImages(x.numpy(), y, poisoned.numpy(), y[keep], 0)


def _serve(tmp_path_factory, checkpoint: Path, name: str, flagged: int | None) -> Iterator[Served]:
    repository = tmp_path_factory.mktemp(name) / "repository"
    build_repository(checkpoint, repository, flagged=flagged)
    token = secrets.token_urlsafe(16)
    with running_server(repository, extra_env=pinned_token(token),
                        restricted_api_key=secrets.token_urlsafe(16)) as server:
        yield Served(server, repository, checkpoint, token)


@pytest.fixture(scope="session")
def defended(tmp_path_factory, digits_checkpoint: Callable[[str], Path]) -> Iterator[Served]:
    """BadNets digits model served with a direction estimated offline from 20 flagged samples."""
    yield from _serve(tmp_path_factory, digits_checkpoint("badnets"), "defended", flagged=20)


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
