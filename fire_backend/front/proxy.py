"""The HTTP front: the only listener on the HTTP, metrics and health ports; tritonserver's own HTTP and metrics
servers listen on private Unix sockets behind it and never face a client.

Triton 2.51's HTTP server (libevhtp) has no body limits and crashes on requests a client can send: a 4 MiB
``application/x-www-form-urlencoded`` POST to ``/v2/health/ready`` or to the metrics port segfaults it, one JSON
request claiming a huge shape aborts it. The front is an aiohttp server (a maintained HTTP implementation, llhttp's
parser) that passes on only well-formed requests:

- **routes**: ``GET``/``HEAD`` of health, server and model metadata, model config, readiness and statistics,
  without a body, proxied; ``POST`` of ``/v2/models/<model>[/versions/<n>]/infer``, checked by
  :mod:`fire_backend.front.kserve` against the model's config (fetched from Triton, cached a few seconds) and
  forwarded as the canonical request it understood; the API groups ``fire serve`` closes answer 403; anything
  else 404 or 405;
- **bodies**: refused with 413 from their ``Content-Length`` before a byte is kept when over the model's bound
  (its largest batch; chunked bodies are counted as they arrive), read within :data:`BODY_TIMEOUT_S`; only JSON or
  octet-stream, never ``Content-Encoding`` (415); ``100 Continue`` only once the headers passed; a refused body is
  discarded as it arrives (aiohttp's lingering read), so the client reads its 4xx;
- **metrics**: ``GET /metrics`` proxied from Triton's metrics socket (the FIRE stage metrics live there);
- **health**: ``/live`` and ``/ready`` answered from ``fire serve``'s supervisor (:mod:`fire_backend.launcher.health`).

Forwarding goes to Triton's own HTTP over a Unix socket in a 0700 directory (sockets 0700 too), so no other user
of the host reaches libevhtp; Triton's responses (JSON or binary outputs) come back as they are. While tritonserver
is down (starting, restarting) the front answers 503. Each listener (:class:`Site`) is aiohttp's low-level server
with a handler that routes by itself; a front's listeners share one asyncio loop in a daemon thread
(:class:`SiteThread`) of the ``fire serve`` process, and outlive tritonserver's restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httptools
from aiohttp import web

from fire_backend.front.kserve import Checker, ModelSpec, RequestError

LOGGER = logging.getLogger(__name__)

#: seconds a client has to send a request body (slow senders are cut off with 408)
BODY_TIMEOUT_S = 30.0
#: seconds an inference may take upstream (tritonclient's default network timeout is 60 s)
INFER_TIMEOUT_S = 120.0
#: seconds for everything else upstream (health, metadata, config, metrics)
PROXY_TIMEOUT_S = 10.0
#: how long a fetched model config is trusted (a reload can change it)
CONFIG_TTL_S = 5.0
#: idle keep-alive connections are closed after this long
KEEPALIVE_S = 75.0
#: bodies larger than this are checked off the event loop (a big JSON array takes a while to parse)
INLINE_CHECK_BYTES = 1 << 20
#: connections to tritonserver kept open
UPSTREAM_CONNECTIONS = 128
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}"
_INFER = re.compile(rf"/v2/models/({_NAME})(?:/versions/([0-9]{{1,9}}))?/infer")
_PROXIED = re.compile(rf"/v2(?:/health/(?:live|ready)|/models/stats|/models/{_NAME}(?:/versions/[0-9]{{1,9}})?"
                      r"(?:/ready|/config|/stats)?)?")
#: Triton API groups fire serve closes (tritonserver refuses them too): answered 403 here, never forwarded
_CLOSED = ("/v2/repository", "/v2/systemsharedmemory", "/v2/cudasharedmemory", "/v2/logging", "/v2/trace")
_BODY_TYPES = ("", "application/json", "application/octet-stream")
_INFERENCE_CLOSED = ("inference over HTTP is closed on this server (fire serve --no-http-inference): use gRPC, "
                     "or restart it without --no-http-inference")
#: Triton's response headers a client needs
_PASSED_BACK = ("Content-Type", "Inference-Header-Content-Length")
_PASSED_BACK_LOWER = {name.lower().encode(): name for name in _PASSED_BACK}
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Upstream:
    """Where tritonserver's own HTTP and metrics servers listen: ``unix:PATH`` or ``HOST:PORT`` each."""

    http: str
    metrics: str


def _error(status: int, message: str, **headers: str) -> web.Response:
    """Triton's error shape, which tritonclient reads: ``{"error": "..."}``. Answered before a body was read, aiohttp
    then reads and discards what the client still sends (for at most its lingering time, 10 s), so the client gets
    the answer instead of a reset connection."""
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _no_body(request: web.BaseRequest) -> bool:
    return not request.content_length and "Transfer-Encoding" not in request.headers


def _methods(request: web.BaseRequest, allowed: tuple[str, ...]) -> web.Response | None:
    if request.method in allowed:
        return None
    return _error(405, f"{request.method} is not allowed here; allowed: {', '.join(allowed)}",
                   Allow=", ".join(allowed))


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes (chunked included): RequestError 413 past it, 408 when too slow."""
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # only now: the headers passed
    elif request.content_length is not None and request.content.is_eof():
        return request.content.read_nowait()  # a small body arrives with its headers: no wait, no timer
    parts: list[bytes] = []

    async def collect() -> None:
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body exceeds this model's bound of {limit} bytes")
            parts.append(chunk)

    try:
        await asyncio.wait_for(collect(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body did not arrive within {BODY_TIMEOUT_S:g} s") from None
    return b"".join(parts)


class _Specs:
    """A checker per model, from its config fetched from tritonserver and trusted for :data:`CONFIG_TTL_S` (a
    checker whose config did not change is kept, with what it remembers)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, Checker]] = {}

    async def get(self, upstream: _Client, path: str) -> Checker:
        now = time.monotonic()
        hit = self._cache.get(path)
        if hit is not None and now - hit[0] < CONFIG_TTL_S:
            return hit[1]
        status, body, _ = await upstream.request("GET", path, timeout_s=PROXY_TIMEOUT_S)
        if status != 200:
            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = f"tritonserver answered {status} for the model's config"
            raise RequestError(status if 400 <= status < 500 else 503, str(message))
        spec = ModelSpec.from_config(json.loads(body))
        checker = hit[1] if hit is not None and hit[1].spec == spec else Checker(spec)
        self._cache[path] = (now, checker)
        return checker


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to tritonserver; responses parsed by httptools (llhttp)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self._answer: asyncio.Future[tuple[int, bytes, dict[str, str]]] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError("tritonserver closed the connection"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.reusable = False
            if self._answer is not None and not self._answer.done():
                self._answer.set_exception(ConnectionError(f"unreadable answer from tritonserver: {exc}"))
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        key = _PASSED_BACK_LOWER.get(name.lower())
        if key is not None:
            self._headers[key] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result((self.parser.get_status_code(), b"".join(self._body), self._headers))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes, dict[str, str]]]:
        assert self.transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._headers, self._body, self.reusable = {}, [], False
        self.transport.write(request)
        return self._answer


class _Client:
    """Requests to one of tritonserver's servers over a pool of keep-alive connections, on the front's loop.

    A minimal client on purpose: the front forwards thousands of small requests a second and aiohttp's full client
    cost about as much CPU as the rest of the front together. The request line and headers are written from
    checked values only (a path the route's pattern matched, byte counts, fixed media types); responses are parsed
    by httptools, the llhttp binding uvicorn uses.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._idle: list[_Connection] = []

    async def close(self) -> None:
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None:
                connection.transport.close()

    def _reuse(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self.address.startswith("unix:"):
            _, connection = await loop.create_unix_connection(_Connection, self.address.removeprefix("unix:"))
        else:
            host, port = self.address.rsplit(":", 1)
            _, connection = await loop.create_connection(_Connection, host, int(port))
        return connection

    async def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                      timeout_s: float = INFER_TIMEOUT_S) -> tuple[int, bytes, dict[str, str]]:
        """Status, body and passed-back headers; RequestError 503 when tritonserver is not there, 504 when slow."""
        lines = [f"{method} {path} HTTP/1.1", "Host: tritonserver", "Accept-Encoding: identity",
                 f"Content-Length: {len(body or b'')}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        connection = None
        try:
            connection = self._reuse()
            if connection is not None:
                try:
                    answer = await asyncio.wait_for(connection.send(request), timeout_s)
                except ConnectionError:  # closed by tritonserver while idle: once more, on a new connection
                    connection = None
            if connection is None:
                connection = await self._connect()
                answer = await asyncio.wait_for(connection.send(request), timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"tritonserver did not answer within {timeout_s:g} s") from None
        except OSError:  # refused, reset, no socket: tritonserver is not there (ConnectionError is one)
            raise RequestError(503, "tritonserver is not serving right now (starting or restarting); retry") \
                from None
        finally:
            if connection is not None and connection.reusable and len(self._idle) < UPSTREAM_CONNECTIONS:
                self._idle.append(connection)
            elif connection is not None and connection.transport is not None:
                connection.transport.close()
        return answer


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Site:
    """One listener of the front: a port, the handler that routes its requests itself (so 404/405/403 are its own,
    with no router or middleware between), and the upstream clients it uses."""

    what: str
    host: str
    port: int
    handler: Handler
    clients: tuple[_Client, ...] = ()


def _guarded(handler: Handler) -> Handler:
    """``handler`` with every refusal and failure answered as JSON (``{"error": ...}``)."""

    async def guarded(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except web.HTTPException as exc:  # aiohttp's own: keep its status, say it in JSON
            return _error(exc.status, exc.reason)
        except Exception:
            LOGGER.exception("the HTTP front failed on %s %s", request.method, request.path)
            return _error(500, "internal error in the HTTP front (see the fire serve log)")

    return guarded


def http_site(host: str, port: int, upstream: str, http_inference: bool = True) -> Site:
    """The KServe v2 HTTP API, checked and forwarded to tritonserver's HTTP at ``upstream``."""
    client, specs = _Client(upstream), _Specs()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.rel_url.raw_path  # percent-encoded paths match nothing: no decoding tricks
        infer = _INFER.fullmatch(path)
        if infer is not None:
            return _methods(request, ("POST",)) or await _infer(request, infer.group(1), infer.group(2))
        if _PROXIED.fullmatch(path):
            refused = _methods(request, ("GET", "HEAD"))
            if refused is not None:
                return refused
            if not _no_body(request):
                return _error(413, f"{request.method} takes no body")
            status, body, headers = await client.request("GET", path, timeout_s=PROXY_TIMEOUT_S)
            return web.Response(status=status, body=body, headers=headers)
        if path.startswith(_CLOSED):
            return _error(403, "this API is restricted: fire serve closes it to every client")
        return _error(404, "not found: this server serves the KServe v2 health, metadata and inference "
                           "API under /v2")

    async def _infer(request: web.BaseRequest, model: str, version: str | None) -> web.StreamResponse:
        if not http_inference:
            return _error(403, _INFERENCE_CLOSED)
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            return _error(415, "compressed bodies are not accepted (send Content-Encoding: identity)")
        media = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media not in _BODY_TYPES:
            return _error(415, f"Content-Type {media!r} is not accepted: send application/json, or the "
                           f"binary tensor extension with {HEADER_LENGTH}")
        header_length = None
        if HEADER_LENGTH in request.headers:
            text = request.headers[HEADER_LENGTH]
            if not text.isdigit() or len(text) > 10:
                return _error(400, f"{HEADER_LENGTH} must be a byte count")
            header_length = int(text)
        base = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        checker = await specs.get(client, base + "/config")
        limit = checker.spec.body_limit()
        if (request.content_length or 0) > limit:
            return _error(413, f"{request.content_length} bytes exceed {model}'s bound of {limit} bytes "
                           f"(its largest batch)")
        body = await _read_body(request, limit)
        if len(body) > INLINE_CHECK_BYTES:
            checked = await asyncio.get_running_loop().run_in_executor(None, checker.check, body, header_length)
        else:
            checked = checker.check(body, header_length)
        headers = {"Content-Type": "application/octet-stream" if checked.binary else "application/json"}
        if checked.header_length is not None:
            headers[HEADER_LENGTH] = str(checked.header_length)
        status, answer, back = await client.request("POST", base + "/infer", checked.body, headers)
        return web.Response(status=status, body=answer, headers=back)

    return Site("http", host, port, handle, (client,))


def metrics_site(host: str, port: int, upstream: str) -> Site:
    """``GET /metrics``: tritonserver's Prometheus text (the nv_* and fire_* metrics), proxied."""
    client = _Client(upstream)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.rel_url.raw_path != "/metrics":
            return _error(404, "not found; the metrics are at /metrics")
        refused = _methods(request, ("GET", "HEAD"))
        if refused is not None:
            return refused
        if not _no_body(request):
            return _error(413, f"{request.method} takes no body")
        status, body, headers = await client.request("GET", "/metrics", timeout_s=PROXY_TIMEOUT_S)
        return web.Response(status=status, body=body, headers=headers)

    return Site("metrics", host, port, handle, (client,))


def health_site(host: str, port: int, snapshot: Callable[[], dict[str, Any]], paths: dict[str, str]) -> Site:
    """``paths`` (path -> the snapshot's boolean that decides 200 or 503), answered with the snapshot as JSON."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        key = paths.get(request.rel_url.raw_path)
        if key is None:
            return _error(404, f"not found; try {' or '.join(paths)}")
        refused = _methods(request, ("GET", "HEAD"))
        if refused is not None:
            return refused
        body = snapshot()
        return web.Response(status=200 if body.get(key) else 503, text=json.dumps(body) + "\n",
                            content_type="application/json")

    return Site("health", host, port, handle)


class BindError(OSError):
    """A port the front could not listen on (``what``: http, metrics or health)."""

    def __init__(self, what: str, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.what, self.host, self.port = what, host, port


class SiteThread:
    """aiohttp applications served on one asyncio loop of their own, in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.ServerRunner] = []
        self._clients: list[_Client] = []
        self.ports: dict[str, int] = {}

    def start(self, sites: Sequence[Site]) -> SiteThread:
        """Serve each site; raises :class:`BindError` (and serves nothing) when a port is taken. Port 0 picks a free
        one (see :attr:`ports`).

        What the process holds by then (imported modules, torch in a bench or test process) is collected once and
        frozen out of the cyclic collector's sight: otherwise a full collection, which the front's own short-lived
        garbage triggers now and then, walks all of it while every request waits (260 ms in a process that
        imported torch, on 2 busy cores; the fire stubs freeze their load-time objects for the same reason).
        """
        gc.collect()
        gc.freeze()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._open(sites), loop).result()
        except BaseException:
            self.stop()
            raise
        return self

    async def _open(self, sites: Sequence[Site]) -> None:
        for site in sites:
            # aiohttp's low-level server: no router, no middleware, no automatic 100 Continue
            server = web.Server(_guarded(site.handler), access_log=None, keepalive_timeout=KEEPALIVE_S,
                                auto_decompress=False)
            runner = web.ServerRunner(server, shutdown_timeout=1.0, handle_signals=False)
            await runner.setup()
            self._runners.append(runner)
            self._clients.extend(site.clients)
            try:
                await web.TCPSite(runner, site.host, site.port).start()
            except OSError as exc:
                raise BindError(site.what, site.host, site.port, exc) from exc
            self.ports[site.what] = int(runner.addresses[0][1])

    async def _close(self) -> None:
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        for client in self._clients:
            await client.close()
        self._clients.clear()
        # connections still open (idle keep-alives) end here, not as warnings when the loop closes
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close every listener and connection, then end the thread; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout_s)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None
        gc.unfreeze()  # what start() froze is the collector's again (a test process goes on after its servers)


class Front(SiteThread):
    """The public HTTP and metrics listeners of one server, forwarding to its tritonserver at ``upstream``."""

    def __init__(self, host: str, http_port: int, metrics_port: int, upstream: Upstream,
                 http_inference: bool = True) -> None:
        super().__init__("fire-front")
        self.host, self.http_port, self.metrics_port = host, http_port, metrics_port
        self.upstream = upstream
        self.http_inference = http_inference

    def open(self) -> Front:
        """Listen on both ports (BindError when one is taken)."""
        return self.start([http_site(self.host, self.http_port, self.upstream.http, self.http_inference),
                           metrics_site(self.host, self.metrics_port, self.upstream.metrics)])
