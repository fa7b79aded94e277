"""TCP ports for tritonserver: free ones for tests and scripts, and whether one is taken before a start."""

from __future__ import annotations

import errno
import socket

from fire_backend.wire.names import DEFAULT_HOST

#: bind addresses that mean "every interface"; clients then dial loopback
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = DEFAULT_HOST) -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it; racy by nature)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = DEFAULT_HOST) -> list[int]:
    """Return ``n`` distinct free TCP ports (sockets are held open together so the OS can't repeat one)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(_family(host), socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on ``host:port``.

    SO_REUSEADDR mirrors what tritonserver does, so a port merely in TIME_WAIT is not reported as busy. Any other
    failure to bind (an address not on this machine) raises OSError.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False
