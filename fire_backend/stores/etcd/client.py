"""A small etcd v3 client over etcd's JSON gateway (HTTP/1.1): stdlib only, synchronous, bounded in time.

Why our own: the PyPI gRPC clients either pin grpcio/protobuf against tritonclient's, fail to import under
protobuf >= 4, are asyncio-only without TLS, or cannot resume a watch from a revision (docs/store-engine.md).
The direction store needs five calls (range, put, txn, watch, lease); the gateway (``/v3/...``, served by etcd
3.4 to 3.6) takes them as JSON with keys and values in base64 and 64-bit integers as strings.

Every failure is classified: :class:`EngineUnavailable` (not reached or not now: retry; a write's outcome is
unknown) or :class:`EngineError` (etcd answered no: final). Torch-free, so any process can use it.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # ssl is imported only with TLS: a Python-backend stub may be unable to load _ssl
    import ssl

RETRYABLE = ("no leader", "timed out", "leader changed", "is closing", "transport is closing", "stopped")


class EngineUnavailable(Exception):
    """etcd could not be reached or did not answer in time; the outcome of a write is unknown."""


class EngineError(Exception):
    """etcd answered with an error (bad request, too large, no leader...)."""


class WatchCompacted(Exception):
    """The watch's start revision was compacted away; re-read the current state and watch again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int

    @classmethod
    def of(cls, raw: dict[str, Any]) -> KV:
        return cls(unb64(raw.get("key")), unb64(raw.get("value")), int(raw.get("create_revision", 0)),
                   int(raw.get("mod_revision", 0)), int(raw.get("version", 0)))


@dataclass(frozen=True)
class WatchEvent:
    """One batch from a watch stream: ``kvs`` changed at ``revision``; empty ``kvs`` = progress/idle."""

    revision: int
    kvs: tuple[KV, ...]
    deleted: tuple[bytes, ...] = ()


IDLE = WatchEvent(0, ())


class EtcdClient:
    """One endpoint (``host:port``: a member, or a Service in front of the cluster); one kept-alive connection
    per thread, reopened after any failure (so a Service's next connection may reach another member)."""

    def __init__(self, host: str, port: int, timeout: float = 2.0, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: an SSLContext with etcd's CA loaded and, for --client-cert-auth, our client cert."""
        self.host, self.port, self.timeout, self.tls = host, port, timeout, tls
        self._local = threading.local()  # one keep-alive connection per thread

    # -- plumbing ---------------------------------------------------------------------------
    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        conn = getattr(self._local, "conn", None)
        reused = conn is not None
        if conn is None:
            conn = self._local.conn = self._connect(timeout or self.timeout)
        try:
            conn.request("POST", f"/v3/{path}", body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._local.conn = None
            if self.tls is not None and "CERTIFICATE" in str(exc).upper():
                raise EngineError(
                    f"etcd {self.host}:{self.port}: TLS refused ({exc}); check ca=, cert=, key=") from None
            # A kept-alive connection the engine closed (restart): a read is simply sent again. A
            # write whose answer is lost may or may not have landed: the caller resolves that.
            if reused and path == "kv/range" and isinstance(exc, ConnectionError | http.client.RemoteDisconnected):
                return self.call(path, body, timeout)
            raise EngineUnavailable(f"etcd {self.host}:{self.port} {path}: {exc!r}") from None
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            raise EngineError(f"etcd {path}: unreadable answer {data[:200]!r}") from None
        if response.status != 200:
            message = str(answer.get("error") or answer.get("message") or data[:200])
            # The gateway maps gRPC codes to HTTP: Canceled 408 (seen while etcd shuts down: "the client
            # connection is closing"), Unavailable 503, DeadlineExceeded 504. These, and a member
            # without a leader, mean "not now": retry. Anything else (400, 413, 429 quota) is final.
            if response.status in (408, 502, 503, 504) or any(t in message for t in RETRYABLE):
                raise EngineUnavailable(f"etcd {path}: HTTP {response.status}: {message}")
            raise EngineError(f"etcd {path}: HTTP {response.status}: {message}")
        return answer

    # -- kv -------------------------------------------------------------------------------
    def get(self, key: bytes, revision: int = 0) -> tuple[KV | None, int]:
        """The key (or None) and the store revision the read saw. Linearizable."""
        body: dict[str, Any] = {"key": b64(key)}
        if revision:
            body["revision"] = revision
        answer = self.call("kv/range", body)
        kvs = answer.get("kvs") or []
        return (KV.of(kvs[0]) if kvs else None), int(answer["header"]["revision"])

    def get_prefix(self, prefix: bytes, start: bytes = b"", limit: int = 0, keys_only: bool = False) -> list[KV]:
        """Keys under ``prefix`` (from ``start`` on) in key order, read in pages at one revision."""
        out: list[KV] = []
        start, end, revision = max(prefix, start), prefix_end(prefix), 0
        while True:
            body: dict[str, Any] = {"key": b64(start), "range_end": b64(end), "limit": limit or 1000,
                                    "keys_only": keys_only}
            if revision:
                body["revision"] = revision
            answer = self.call("kv/range", body)
            revision = int(answer["header"]["revision"])
            page = [KV.of(raw) for raw in answer.get("kvs") or []]
            out.extend(page)
            if not answer.get("more") or not page:
                return out
            start = page[-1].key + b"\0"

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict]) -> tuple[bool, dict[str, Any]]:
        answer = self.call("kv/txn", {"compare": compare, "success": success, "failure": failure})
        return bool(answer.get("succeeded")), answer

    # -- txn building blocks ------------------------------------------------------------------
    @staticmethod
    def cmp_mod_revision(key: bytes, revision: int) -> dict:
        return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}

    @staticmethod
    def cmp_absent(key: bytes) -> dict:
        return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}

    @staticmethod
    def op_put(key: bytes, value: bytes, lease: int = 0) -> dict:
        put = {"key": b64(key), "value": b64(value)}
        if lease:
            put["lease"] = str(lease)
        return {"request_put": put}

    # -- leases ---------------------------------------------------------------------------
    def lease_grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": ttl})["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """Refresh once; returns the new TTL (0 or missing: the lease is gone)."""
        answer = self.call("lease/keepalive", {"ID": str(lease)})
        return int((answer.get("result") or answer).get("TTL", 0))

    def lease_revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": str(lease)})

    # -- watch ------------------------------------------------------------------------------
    def watch(self, key: bytes, start_revision: int, prefix: bool = False, idle: float = 1.0) -> Iterator[WatchEvent]:
        """Stream changes of ``key`` (or its prefix) from ``start_revision`` on.

        Yields IDLE after ``idle`` seconds without data, so the caller can check liveness (a
        partitioned engine sends nothing and closes nothing). Raises EngineUnavailable when the
        stream breaks and WatchCompacted when ``start_revision`` is no longer kept. The
        ``hasleader`` metadata makes a member that lost its leader cancel the watch instead of
        going silent. A raw socket, not http.client: a read timeout poisons http.client's
        socket file, and the stream must survive idle periods.
        """
        create: dict[str, Any] = {"key": b64(key), "start_revision": str(start_revision), "progress_notify": True}
        if prefix:
            create["range_end"] = b64(prefix_end(key))
        body = json.dumps({"create_request": create}).encode()
        request = (f"POST /v3/watch HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   "Content-Type: application/json\r\nGrpc-Metadata-hasleader: true\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except OSError as exc:
            raise EngineUnavailable(f"etcd watch: {exc!r}") from None
        try:
            sock.sendall(request)
            lines = _lines(_chunked(sock, idle, self.timeout))
            for line in lines:
                if line is None:
                    yield IDLE
                    continue
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    raise EngineUnavailable(f"etcd watch: {message['error']}")
                result = message.get("result", {})
                if result.get("compact_revision") and result.get("canceled"):
                    raise WatchCompacted(int(result["compact_revision"]))
                if result.get("canceled"):
                    raise EngineUnavailable(f"etcd watch canceled: {result.get('cancel_reason', '')}")
                events = result.get("events") or []
                puts = tuple(KV.of(e["kv"]) for e in events if e.get("type", "PUT") == "PUT")
                deletes = tuple(unb64(e["kv"]["key"]) for e in events if e.get("type") == "DELETE")
                yield WatchEvent(int(result.get("header", {}).get("revision", 0)), puts, deletes)
        except (OSError, ValueError) as exc:
            raise EngineUnavailable(f"etcd watch: {exc!r}") from None
        finally:
            sock.close()

    def healthy(self) -> bool:
        conn = self._connect(self.timeout)
        try:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read()).get("health") == "true"
        except (OSError, http.client.HTTPException, ValueError):
            return False
        finally:
            conn.close()


def _recv(sock: socket.socket, idle: float) -> bytes | None:
    """Some bytes, or None after ``idle`` seconds of silence; EngineUnavailable on EOF."""
    pending = getattr(sock, "pending", None)  # an SSLSocket's decrypted bytes, which select() can't see
    buffered = pending is not None and pending()
    if not buffered and not select.select([sock], [], [], idle)[0]:
        return None
    data = sock.recv(65536)
    if not data:
        raise EngineUnavailable("etcd watch stream closed")
    return data


def _chunked(sock: socket.socket, idle: float, timeout: float) -> Iterator[bytes | None]:
    """The decoded body of a chunked HTTP/1.1 response (None: idle tick)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = _recv(sock, timeout)
        if data is None:
            raise EngineUnavailable("etcd watch: no response headers")
        buffer += data
    head, buffer = buffer.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise EngineUnavailable(f"etcd watch: {head[:200]!r}")
    if b"chunked" not in head.lower():
        raise EngineError("etcd watch: expected a chunked stream")
    while True:
        while b"\r\n" not in buffer:
            data = _recv(sock, idle)
            if data is None:
                yield None
                continue
            buffer += data
        size_line, buffer = buffer.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            raise EngineUnavailable("etcd watch stream ended")
        while len(buffer) < size + 2:
            data = _recv(sock, idle)
            if data is None:
                yield None
                continue
            buffer += data
        yield buffer[:size]
        buffer = buffer[size + 2:]


def _lines(chunks: Iterator[bytes | None]) -> Iterator[bytes | None]:
    """Newline-delimited messages (a message may span chunks, a chunk may hold several)."""
    pending = b""
    for chunk in chunks:
        if chunk is None:
            yield None
            continue
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line
