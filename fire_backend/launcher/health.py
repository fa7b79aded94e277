"""``fire serve``'s own health endpoint: ``/live`` and ``/ready``, answered from the supervisor's state.

Triton 2.51's ``/v2/health/ready`` stays 200 while a stage's stub is dead (readiness reports the model, not its
instances), so orchestrators probe this endpoint instead: ``/ready`` is 503 while the server starts, restarts, a
stage is degraded, a repair instance has no verified direction version, or tritonserver does not answer its own
readiness check in time; ``/live`` is 503 once the supervisor gave up (or its loop stalled), so the orchestrator
restarts the container. Both answer a small JSON object. GET and HEAD only (405 otherwise); request bodies are
never read. Served by the HTTP front's machinery (:mod:`fire_backend.front.proxy`), on a loop of its own so it
answers whatever tritonserver and the inference front are doing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fire_backend.front.proxy import SiteThread, health_site

#: path -> the health() key that decides 200 or 503
PATHS = {"/live": "live", "/ready": "ready"}


class HealthServer:
    """Serves ``snapshot()`` (a dict with boolean ``live`` and ``ready``) on ``host:port`` in a daemon thread."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.host, self._port = host, port
        self._snapshot = snapshot
        self._sites = SiteThread("fire-health")

    @property
    def port(self) -> int:
        return self._sites.ports.get("health", self._port)

    def start(self) -> HealthServer:
        """Listen (raises OSError, a :class:`~fire_backend.front.proxy.BindError`, when the port is taken)."""
        self._sites.start([health_site(self.host, self._port, self._snapshot, PATHS)])
        return self

    def stop(self) -> None:
        self._sites.stop()
