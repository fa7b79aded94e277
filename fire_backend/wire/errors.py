"""What went wrong on the wire, said once: tritonclient's exceptions become errors that name the fix.

Classified by type and status code, never by matching message text: gRPC reports ``StatusCode.UNAVAILABLE``
when nothing listens (and a repairing stage that holds requests answers UNAVAILABLE too, its message starting with
the wire constant ``HOLDING``) and ``DEADLINE_EXCEEDED`` on a timeout; the HTTP client raises ``OSError`` (connection
refused or reset, DNS, socket timeouts) before any status exists.
"""

from __future__ import annotations

from fire_backend.wire.names import DEFAULT_HOST, DEFAULT_PORTS, FIRE_CONTROL, HOLDING, INFERENCE_MODELS


class FireClientError(Exception):
    """An error the user can fix; the message names the fix."""


class ServerUnreachable(FireClientError):
    """Nothing answers at the URL."""


def short(exc: BaseException) -> str:
    """The first line of an exception's text, at most 200 characters."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    return first if len(first) <= 200 else first[:197] + "..."


def unreachable(address: str, protocol: str, exc: BaseException) -> ServerUnreachable:
    reason = short(exc).rsplit(": ", 1)[-1]  # gRPC: "... Failed to connect to remote host: Connection refused"
    return ServerUnreachable(
        f"cannot reach {address}: is `fire serve` running? pass --url "
        f"(e.g. --url {protocol}://{DEFAULT_HOST}:{DEFAULT_PORTS[protocol]}) [{protocol}: {reason}]"
    )


def _missing_model(address: str, model: str) -> FireClientError:
    if model == FIRE_CONTROL:
        fix = "serve a repository written by `fire repo build` (it includes the control endpoint)"
    else:
        fix = f"pass --model one of {', '.join(INFERENCE_MODELS)} (and check the server's model list)"
    return FireClientError(f"model {model!r} is not loaded on {address}: {fix}")


def translate(exc: BaseException, address: str, protocol: str, timeout_s: float,
              model: str | None = None) -> FireClientError:
    """The FireClientError for anything a tritonclient call to ``address`` raised (``model``: the one asked)."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, FireClientError):
        return exc
    if isinstance(exc, OSError):  # HTTP: connection refused/reset, DNS, timeouts
        return unreachable(address, protocol, exc)
    if isinstance(exc, InferenceServerException):
        status, message = str(exc.status() or ""), exc.message() or str(exc)
        if "UNAVAILABLE" in status and message.startswith(HOLDING):  # the server answered: it holds requests
            return FireClientError(f"{address}: {message}")
        if "UNAVAILABLE" in status:
            return unreachable(address, protocol, exc)
        if protocol == "http" and status == "403":  # a closed API group; for a client that is HTTP inference
            return FireClientError(
                f"{address}: this server does not accept inference over HTTP: use gRPC (--url "
                f"grpc://HOST:GRPC_PORT), or start the server without `fire serve --no-http-inference`")
        if "DEADLINE_EXCEEDED" in status:
            return FireClientError(f"{address}: no answer within {timeout_s:g} s: the server is "
                                   "overloaded or stuck; retry, or raise the timeout")
        if model is not None and ("unknown model" in message or "NOT_FOUND" in status or status == "404"):
            return _missing_model(address, model)
        return FireClientError(f"{address}: server refused the request: {message}")
    return FireClientError(f"{address}: {short(exc)}")
