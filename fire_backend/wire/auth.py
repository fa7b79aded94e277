"""Request-bound credentials: how a client proves it holds the control token without sending it.

A credential is ``v1:<unix seconds>:<nonce>:<HMAC-SHA256 hex>``, the HMAC keyed by the token over the purpose
("control", "bypass"), the time, the nonce and a digest of the request it authorises. Why not the token itself:
whatever a request carries is copied into the Python-backend stub's shared-memory region (world-readable in
``/dev/shm`` on Triton 2.51) and may cross an unencrypted network; a credential seen there authorises only that
one request, for at most :data:`WINDOW_S` seconds, and reveals nothing about the token.

The server checks the MAC in constant time and the time window; the control endpoint also refuses a nonce it
has seen within the window (:class:`ReplayGuard`), so a captured control request cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass

CREDENTIAL_VERSION = "v1"
#: seconds a credential stays valid on either side of the server's clock
WINDOW_S = 60.0
#: what a credential authorises; part of the MAC, so one purpose's credential never passes for another
CONTROL = "control"
BYPASS = "bypass"
PURPOSES = (CONTROL, BYPASS)


class AuthError(ValueError):
    """The credential is missing, malformed, expired, replayed or wrong; nothing was done."""


@dataclass(frozen=True)
class Credential:
    issued: int
    nonce: str


def digest(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts, so ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def _mac(token: str, purpose: str, issued: int, nonce: str, payload: bytes) -> str:
    message = f"{CREDENTIAL_VERSION}|{purpose}|{issued}|{nonce}|".encode() + payload
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def sign(token: str, purpose: str, payload: bytes, now: float | None = None) -> str:
    """A fresh credential for one request whose content digests to ``payload`` (see :func:`digest`)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")
    if not token:
        raise ValueError("no control token to sign with")
    issued = int(time.time() if now is None else now)
    nonce = secrets.token_hex(12)
    return f"{CREDENTIAL_VERSION}:{issued}:{nonce}:{_mac(token, purpose, issued, nonce, payload)}"


def verify(token: str, purpose: str, payload: bytes, credential: str, now: float | None = None,
           window_s: float = WINDOW_S) -> Credential:
    """The parsed credential if it was made with ``token`` for this purpose and payload within the window.

    Raises AuthError with a message that names the problem but never the token or the expected MAC.
    """
    parts = credential.split(":") if isinstance(credential, str) else []
    if len(parts) != 4 or parts[0] != CREDENTIAL_VERSION or not parts[1].isdigit() or not parts[2] \
            or len(parts[3]) != 64:
        raise AuthError("permission denied: missing or malformed credential (sign the request with the control "
                        "token: fire ctl / FireClient do this)")
    issued, nonce, mac = int(parts[1]), parts[2], parts[3]
    clock = time.time() if now is None else now
    if abs(clock - issued) > window_s:
        raise AuthError(f"permission denied: the credential is {abs(clock - issued):.0f} s off the server's clock "
                        f"(at most {window_s:g} s); check the clocks")
    if not hmac.compare_digest(mac, _mac(token, purpose, issued, nonce, payload)):
        raise AuthError("permission denied: wrong control token")
    return Credential(issued, nonce)


class ReplayGuard:
    """Remembers the nonces of valid credentials for the window, so each one is accepted once."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._seen: set[str] = set()
        self._order: deque[tuple[float, str]] = deque()

    def remember(self, credential: Credential, now: float | None = None) -> None:
        """Record ``credential``; AuthError if its nonce was already used within the window."""
        clock = time.time() if now is None else now
        while self._order and self._order[0][0] < clock - 2 * self.window_s:
            self._seen.discard(self._order.popleft()[1])
        if credential.nonce in self._seen:
            raise AuthError("permission denied: this credential was already used (replayed request)")
        self._seen.add(credential.nonce)
        self._order.append((clock, credential.nonce))
