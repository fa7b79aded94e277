"""Where a server is: one parser for every URL a user types (`fire infer`, `fire ctl`, Locust's --host).

Accepted forms: ``grpc://HOST:PORT``, ``http://HOST:PORT``, ``HOST:PORT`` and ``HOST`` (the protocol then
comes from the caller, default gRPC), IPv6 hosts in brackets. A missing port is the protocol's default.
"""

from __future__ import annotations

from dataclasses import dataclass

from fire_backend.wire.errors import FireClientError
from fire_backend.wire.names import DEFAULT_PORTS, PROTOCOLS


@dataclass(frozen=True)
class Endpoint:
    protocol: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` as tritonclient takes it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.address}"


def url_scheme(url: str | None) -> str | None:
    """The protocol a URL names by its scheme (``grpc``/``http``), or None for a bare or unknown one."""
    scheme, sep, _ = (url or "").strip().partition("://")
    return scheme.lower() if sep and scheme.lower() in PROTOCOLS else None


def parse_url(url: str, protocol: str | None = None) -> Endpoint:
    """``grpc://H:P`` | ``http://H:P`` | ``H:P`` | ``H`` (+ ``protocol``, default grpc) -> Endpoint.

    Raises FireClientError naming the accepted forms.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise FireClientError(f"unknown protocol {protocol!r}: use grpc or http")
    text = url.strip().rstrip("/")
    scheme, sep, rest = text.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme == "https":
            raise FireClientError(f"{url}: TLS is not supported by this client; use http:// on a trusted network")
        if scheme not in PROTOCOLS:
            raise FireClientError(f"{url}: unknown scheme {scheme!r}: use grpc://HOST:PORT or http://HOST:PORT")
        if protocol is not None and protocol != scheme:
            raise FireClientError(f"{url} is a {scheme} URL but the protocol is {protocol}: drop one of them")
        protocol = scheme
    else:
        rest = text
    protocol = protocol or "grpc"
    if "/" in rest:
        raise FireClientError(f"{url}: expected HOST:PORT without a path")
    if rest.startswith("["):  # [v6]:port
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host, port_text = rest, ""
    if not host:
        raise FireClientError(f"{url}: no host (expected e.g. {protocol}://127.0.0.1:{DEFAULT_PORTS[protocol]})")
    try:
        port = int(port_text) if port_text else DEFAULT_PORTS[protocol]
    except ValueError:
        raise FireClientError(f"{url}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise FireClientError(f"{url}: port {port} is out of range")
    return Endpoint(protocol, host, port)
