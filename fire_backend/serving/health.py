"""``fire serve``'s own health endpoint: ``/live`` and ``/ready``, answered from the supervisor's state.

Triton 2.51's ``/v2/health/ready`` stays 200 while a stage's stub is dead (readiness reports the model, not its
instances), so orchestrators probe this endpoint instead: ``/ready`` is 503 while the server starts, restarts, a
stage is degraded, or tritonserver does not answer its own readiness check in time; ``/live`` is 503 once the
supervisor gave up (or its loop stalled), so the orchestrator restarts the container. Both answer a small JSON
object. GET and HEAD only; request bodies are never read.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: path -> the health() key that decides 200 or 503
PATHS = {"/live": "live", "/ready": "ready"}
#: seconds a client may take to send its request line and headers
REQUEST_TIMEOUT_S = 5.0


class HealthServer:
    """Serves ``snapshot()`` (a dict with boolean ``live`` and ``ready``) on ``host:port`` in a daemon thread."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        handler = type("Handler", (_Handler,), {"snapshot": staticmethod(snapshot)})
        server_class = type("Server", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True})
        self._httpd = server_class((host, port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fire-health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    snapshot: Callable[[], dict[str, Any]]
    timeout = REQUEST_TIMEOUT_S
    server_version = "fire-health"
    sys_version = ""

    def _answer(self, with_body: bool) -> None:
        key = PATHS.get(self.path.split("?", 1)[0])
        if key is None:
            status, body = 404, {"error": f"not found; try {' or '.join(PATHS)}"}
        else:
            body = self.snapshot()
            status = 200 if body.get(key) else 503
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if with_body:
            self.wfile.write(data)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(with_body=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return None  # probes every few seconds would drown the log
