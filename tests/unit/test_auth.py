"""Request-bound credentials: a credential authorises one purpose, one payload, within the time window, once."""

from __future__ import annotations

import pytest

from fire_backend.wire.auth import (
    BYPASS,
    CONTROL,
    WINDOW_S,
    AuthError,
    ReplayGuard,
    digest,
    sign,
    verify,
)

TOKEN = "s3cret-token"
NOW = 1_800_000_000.0


def test_a_signed_credential_verifies_and_never_contains_the_token() -> None:
    payload = digest(b'{"action": "status"}', b"")
    credential = sign(TOKEN, CONTROL, payload, now=NOW)
    assert TOKEN not in credential
    parsed = verify(TOKEN, CONTROL, payload, credential, now=NOW + 1)
    assert parsed.issued == int(NOW)


@pytest.mark.parametrize("change", ["token", "purpose", "payload", "late", "early"])
def test_anything_else_is_refused(change: str) -> None:
    payload = digest(b"request")
    credential = sign(TOKEN, CONTROL, payload, now=NOW)
    token, purpose, now = TOKEN, CONTROL, NOW
    if change == "token":
        token = TOKEN + "x"
    elif change == "purpose":
        purpose = BYPASS
    elif change == "payload":
        payload = digest(b"request2")
    elif change == "late":
        now = NOW + WINDOW_S + 1
    else:
        now = NOW - WINDOW_S - 1
    with pytest.raises(AuthError, match="permission denied"):
        verify(token, purpose, payload, credential, now=now)


@pytest.mark.parametrize("credential", ["", "s3cret-token", "v1:abc:n:" + "0" * 64, "v2:1:n:" + "0" * 64,
                                        "v1:1800000000::" + "0" * 64, "v1:1800000000:n:short", None, 7])
def test_malformed_credentials_are_refused(credential) -> None:
    with pytest.raises(AuthError, match="malformed"):
        verify(TOKEN, CONTROL, digest(b"x"), credential, now=NOW)


def test_digest_separates_its_parts() -> None:
    assert digest(b"ab", b"c") != digest(b"a", b"bc")


def test_replay_guard_accepts_each_nonce_once_and_forgets_after_the_window() -> None:
    guard = ReplayGuard()
    credential = verify(TOKEN, CONTROL, digest(b"x"), sign(TOKEN, CONTROL, digest(b"x"), now=NOW), now=NOW)
    guard.remember(credential, now=NOW)
    with pytest.raises(AuthError, match="already used"):
        guard.remember(credential, now=NOW + WINDOW_S)
    guard.remember(credential, now=NOW + 2 * WINDOW_S + 1)  # long expired: verify() refuses it anyway


def test_sign_refuses_an_empty_token_or_unknown_purpose() -> None:
    with pytest.raises(ValueError):
        sign("", CONTROL, b"")
    with pytest.raises(ValueError):
        sign(TOKEN, "admin", b"")
