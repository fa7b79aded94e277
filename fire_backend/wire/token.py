"""The control token: where `fire serve`, `fire ctl` and the control stage read it, in one order.

Precedence (the first that is set wins):

1. an explicit file (``--token-file``);
2. the file named by ``FIRE_CONTROL_TOKEN_FILE``;
3. the value of ``FIRE_CONTROL_TOKEN``.

A token file holds the token on its first line (surrounding whitespace is stripped); an empty file is an
error, not "no token", and so is a file that other users may read or anyone but its owner (and group) may
write (``chmod 600 FILE``): a readable token lets anyone steer the defence. Group read is allowed, as a
Kubernetes secret mounted with ``fsGroup`` is 0440. The token is never logged: the audit log names it by a
digest.

`fire serve` resolves the token once and pins it for the Python-backend stubs (:func:`stub_environment`), so a
shell's ``FIRE_CONTROL_TOKEN_FILE`` cannot override ``--token-file`` inside the server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "FIRE_CONTROL_TOKEN"
TOKEN_FILE_ENV = "FIRE_CONTROL_TOKEN_FILE"
#: permission bits a token file must not have: any access by others, write by the group
OPEN_TOKEN_FILE_BITS = 0o027


def token_file(explicit: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The token file that applies: ``explicit``, else ``$FIRE_CONTROL_TOKEN_FILE``, else None."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit).expanduser()
    named = env.get(TOKEN_FILE_ENV)
    return Path(named).expanduser() if named else None


def read_token(explicit: Path | str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The control token by the precedence above; None when none is configured.

    Raises ValueError naming the file when it is missing, unreadable or empty.
    """
    env = os.environ if environ is None else environ
    path = token_file(explicit, env)
    if path is None:
        return env.get(TOKEN_ENV) or None
    try:
        mode = path.stat().st_mode
        if mode & OPEN_TOKEN_FILE_BITS:
            raise ValueError(f"{path}: the control token file is open to other users (mode {mode & 0o777:04o}); "
                             f"make it private: chmod 600 {path}")
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the control token file ({exc.strerror or exc}); "
                         f"pass --token-file or set {TOKEN_FILE_ENV} to a readable file") from None
    if not token:
        raise ValueError(f"{path}: the control token file is empty")
    return token


def stub_environment(explicit: Path | str | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the server's stubs that makes their :func:`read_token` find what this process found.

    The file (made absolute) when the token comes from one, else the value; the other variable is blanked, so
    nothing inherited from the shell takes precedence. Empty when no token is configured.
    """
    env = os.environ if environ is None else environ
    token = read_token(explicit, env)  # validates the file here, before a server starts
    if token is None:
        return {}
    path = token_file(explicit, env)
    if path is not None:
        return {TOKEN_FILE_ENV: str(path.resolve()), TOKEN_ENV: ""}
    return pinned_token(token)


def pinned_token(token: str) -> dict[str, str]:
    """Environment for a server whose stubs must use exactly ``token`` (tests, `fire demo`, benchmarks)."""
    return {TOKEN_ENV: token, TOKEN_FILE_ENV: ""}
