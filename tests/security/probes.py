"""What the adversarial suite probes a server with: its handle, HTTP status codes, served versions."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fire_backend.launcher.health import HealthServer
from fire_backend.launcher.server import TritonServer
from fire_backend.launcher.supervisor import Supervisor
from fire_backend.stores.files import DirectionStore
from fire_backend.wire.client import FireClient, InferResult

#: longest a supervised restart may take here (a loaded 2-core box needs 20-80 s for the 7-model repository)
RESTART_BUDGET_S = 150.0


@dataclass
class Hardened:
    """A supervised production-default server and what the tests need to probe it."""

    supervisor: Supervisor
    health: HealthServer
    repository: Path
    token: str

    @property
    def server(self) -> TritonServer:
        return self.supervisor.server

    @property
    def grpc(self) -> str:
        return self.server.urls["grpc"]

    @property
    def http(self) -> str:
        return self.server.urls["http"]

    @property
    def store(self) -> DirectionStore:
        return DirectionStore(self.repository / "artifacts" / "store")

    def ready(self) -> int:
        """HTTP status of `fire serve`'s /ready."""
        return http_status(f"http://127.0.0.1:{self.health.port}/ready")

    def event(self, text: str) -> float | None:
        """time.time() of the first supervisor event containing ``text``."""
        return next((when for when, message in self.supervisor.events if text in message), None)

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Seconds until ``condition()`` held; fails the test after ``timeout_s``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if condition():
                return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout_s:.0f} s; events: {self.supervisor.events[-8:]}")


def http_status(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
                method: str | None = None) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def served(grpc_url: str, images: np.ndarray, batch: int = 8) -> InferResult:
    """fire_ensemble's answer for ``images`` in small requests (so both repair instances take some)."""
    with FireClient(f"grpc://{grpc_url}") as client:
        return client.infer_batches(images, batch)


TINY_CONFIG = ('backend: "python" max_batch_size: 8 instance_group [ { kind: KIND_CPU count: COUNT } ]\n'
               'input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
               'output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n')

#: echoes X as Y; a negative first value makes the stub kill tritonserver (a crash on demand)
TINY_MODEL = """\
import os
import signal

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            if x.size and x.flat[0] < 0:
                os.kill(os.getppid(), signal.SIGKILL)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
        return out
"""


def tiny_repository(root: Path, instances: int = 1) -> Path:
    """A repository with one Python-backend model, ``echo`` (``instances`` stubs), that starts in seconds."""
    version = root / "models" / "echo" / "1"
    version.mkdir(parents=True)
    (version.parent / "config.pbtxt").write_text(TINY_CONFIG.replace("COUNT", str(instances)))
    (version / "model.py").write_text(TINY_MODEL)
    return root
