"""Client code shared by ``fire infer``, ``fire bench``, the Locust users and the tests.

A small typed client over tritonclient's gRPC and HTTP clients for the models of a FIRE repository
(``fire_ensemble``, ``undefended_ensemble``, ``fire_monolithic``), plus image loading (.npz as written by
``fire data export``, PNG files, the embedded digits data set) and the uint8 NHWC -> float NCHW/255
conversion the server expects.

Kept light on purpose: numpy and tritonclient only (tritonclient submodules are imported on first use),
no torch, so Locust workers stay small.

    with FireClient("grpc://127.0.0.1:8001") as client:
        result = client.infer(load_npz("clean.npz").x)          # uint8 NHWC or float NCHW
        print(result.labels, result.flagged, result.scores, result.versions)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fire_backend.defaults import RESERVE, cache_dir, digits_split

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
DEFAULT_URL = "grpc://127.0.0.1:8001"
DEFAULT_MODEL = "fire_ensemble"
#: the inference models of a FIRE repository (fire_control is not an inference model).
MODELS = ("fire_ensemble", "undefended_ensemble", "fire_monolithic")
#: request parameter that makes fire_ensemble skip the repair for that request.
BYPASS_PARAMETER = "fire_bypass"
INPUT_NAME = "IMAGE"
#: output name -> InferResult field; outputs a model lacks stay None.
OUTPUT_FIELDS = {
    "LABEL": "labels",
    "LOGITS": "logits",
    "FLAGGED": "flagged",
    "REPAIR_SCORE": "scores",
    "DIRECTION_VERSION": "versions",
}



class FireClientError(Exception):
    """An error the user can fix; the message names the fix."""


class ServerUnreachable(FireClientError):
    """Nothing answers at the URL."""


# --------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    protocol: str
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.address}"


def parse_url(url: str, protocol: str | None = None) -> Endpoint:
    """``grpc://H:P`` | ``http://H:P`` | ``H:P`` | ``H`` (+ ``protocol``, default grpc) -> Endpoint.

    A missing port is the protocol's default (gRPC 8001, HTTP 8000).
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


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC (or one HWC image) -> float32 NCHW in [0, 1]; float NCHW (or one CHW image) passes through.

    Float input must already be in [0, 1] (the server's input contract).
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"uint8 images must be N x H x W x C, got shape {x.shape}")
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 NHWC or float NCHW in [0, 1], got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"float images must be N x C x H x W, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise ValueError("float images must be finite and in [0, 1] (uint8 images are divided by 255 for you)")
    return x


@dataclass(frozen=True)
class Images:
    """uint8 N x H x W x C images with optional true labels and poisoned flags."""

    x: np.ndarray
    y: np.ndarray | None = None
    poisoned: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.x)

    def head(self, n: int | None) -> Images:
        if n is None:
            return self
        cut = slice(0, n)
        return Images(self.x[cut], None if self.y is None else self.y[cut],
                      None if self.poisoned is None else self.poisoned[cut], self.source)

    def model_input(self) -> np.ndarray:
        return to_model_input(self.x)


def load_npz(path: Path | str) -> Images:
    """x (uint8 NHWC), optional y and poisoned, as ``fire data export`` writes them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file (write one with `fire data export`)")
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data.files:
            raise ValueError(f"{path}: no array 'x' (has {sorted(data.files)}); write one with `fire data export`")
        x = data["x"]
        y = data["y"].astype(np.int64) if "y" in data.files else None
        poisoned = data["poisoned"].astype(bool) if "poisoned" in data.files else None
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"{path}: x must be uint8 N x H x W x C, got {x.dtype} {x.shape}")
    for name, arr in (("y", y), ("poisoned", poisoned)):
        if arr is not None and arr.shape != (len(x),):
            raise ValueError(f"{path}: {name} must have shape ({len(x)},), got {arr.shape}")
    return Images(x, y, poisoned, str(path))


def load_pngs(paths: Sequence[Path | str]) -> Images:
    """PNG (or any PIL-readable) files of one size -> uint8 NHWC: grayscale stays 1 channel, alpha is dropped."""
    from PIL import Image

    if not paths:
        raise ValueError("no image files given")
    arrays = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        with Image.open(path) as img:
            mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            arr = np.asarray(img.convert(mode), dtype=np.uint8)
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images differ in size/channels {sorted(shapes)}: resize them to the model's input first")
    source = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return Images(np.stack(arrays), source=source)


@functools.lru_cache(maxsize=1)
def _digits_test_split() -> tuple[np.ndarray, np.ndarray]:
    """The digits test split, cached as .npz per scikit-learn version (importing scikit-learn takes seconds,
    which would stall a Locust worker's event loop)."""
    import os
    from importlib.metadata import version

    cache = cache_dir() / f"digits-test-sklearn-{version('scikit-learn')}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                return _frozen(data["x"]), _frozen(data["y"])
        except (OSError, ValueError, KeyError):
            pass  # damaged: recompute
    _, _, x_test, y_test = digits_split()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x_test, y=y_test)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only cache: fine, just slower next time
    return _frozen(x_test), _frozen(y_test)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    arr.flags.writeable = False
    return arr


def load_digits(n: int | None = None, offset: int = RESERVE) -> Images:
    """The embedded 8x8 digits test split (scikit-learn), skipping the defender's reserve, as uint8 NHWC."""
    x_test, y_test = _digits_test_split()  # shared, read-only
    end = len(x_test) if n is None else offset + n
    if n is not None and (n < 1 or end > len(x_test)):
        raise ValueError(f"the digits test split has {len(x_test) - offset} images after the reserve, asked for {n}")
    return Images(x_test[offset:end], y_test[offset:end], np.zeros(end - offset, bool), "digits (test split)")


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------


@dataclass
class InferResult:
    """Per-sample outputs of one or more requests; outputs the model does not have are None."""

    labels: np.ndarray
    logits: np.ndarray | None = None
    flagged: np.ndarray | None = None
    scores: np.ndarray | None = None
    versions: np.ndarray | None = None
    model: str = DEFAULT_MODEL

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_outputs(cls, model: str, outputs: dict[str, np.ndarray | None]) -> InferResult:
        def flat(name: str, dtype) -> np.ndarray | None:
            arr = outputs.get(name)
            return None if arr is None else np.asarray(arr).reshape(len(arr), -1)[:, 0].astype(dtype)

        labels = flat("LABEL", np.int64)
        if labels is None:
            raise FireClientError(f"model {model!r} returned no LABEL output: is it a FIRE repository model?")
        logits = outputs.get("LOGITS")
        return cls(labels=labels, logits=None if logits is None else np.asarray(logits, np.float32),
                   flagged=flat("FLAGGED", bool), scores=flat("REPAIR_SCORE", np.float32),
                   versions=flat("DIRECTION_VERSION", np.int64), model=model)

    @classmethod
    def concat(cls, parts: Sequence[InferResult]) -> InferResult:
        if not parts:
            raise ValueError("no results to concatenate")

        def cat(name: str):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        fields = {f.name: cat(f.name) for f in dataclasses.fields(cls) if f.name != "model"}
        return cls(model=parts[0].model, **fields)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-friendly dict per sample."""
        out = []
        for i in range(len(self)):
            row: dict[str, Any] = {"label": int(self.labels[i])}
            if self.flagged is not None:
                row["flagged"] = bool(self.flagged[i])
            if self.scores is not None:
                row["score"] = float(self.scores[i])
            if self.versions is not None:
                row["version"] = int(self.versions[i])
            out.append(row)
        return out


# --------------------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_batch_size: int
    input_shape: tuple[int, ...]
    outputs: tuple[str, ...]


class FireClient:
    """tritonclient gRPC or HTTP client for one server; one connection, not thread-safe (one per user/thread).

    ``url``: ``grpc://H:P``, ``http://H:P`` or bare ``H:P`` with ``protocol`` (default grpc). Under gevent
    (Locust) call :func:`init_grpc_gevent` before the first gRPC client is created.
    """

    def __init__(self, url: str = DEFAULT_URL, protocol: str | None = None, timeout_s: float = 60.0) -> None:
        self.endpoint = parse_url(url, protocol)
        self.timeout_s = float(timeout_s)
        self._info: dict[str, ModelInfo] = {}
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        if self.protocol == "grpc":
            self._client = module.InferenceServerClient(self.endpoint.address)
        else:
            self._client = module.InferenceServerClient(
                self.endpoint.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )

    @property
    def protocol(self) -> str:
        return self.endpoint.protocol

    @property
    def url(self) -> str:
        return self.endpoint.url

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (do this before stopping a server: open keep-alives delay its shutdown)."""
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            client.close()

    def __enter__(self) -> FireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- errors ----------------------------------------------------------------------------------

    def _unreachable(self, exc: BaseException) -> ServerUnreachable:
        reason = _short(exc).rsplit(": ", 1)[-1]  # gRPC: "... Failed to connect to remote host: Connection refused"
        return ServerUnreachable(
            f"cannot reach {self.endpoint.address}: is `fire serve` running? pass --url "
            f"(e.g. --url {self.protocol}://127.0.0.1:{DEFAULT_PORTS[self.protocol]}) [{self.protocol}: {reason}]"
        )

    def _translate(self, exc: BaseException, model: str | None = None) -> FireClientError:
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, FireClientError):
            return exc
        if isinstance(exc, OSError):  # HTTP: connection refused/reset, DNS, timeouts
            return self._unreachable(exc)
        if isinstance(exc, InferenceServerException):
            status, message = str(exc.status() or ""), exc.message() or str(exc)
            if "UNAVAILABLE" in status:
                return self._unreachable(exc)
            if "DEADLINE_EXCEEDED" in status:
                return FireClientError(f"{self.endpoint.address}: no answer within {self.timeout_s:g} s: the "
                                       "server is overloaded or stuck; retry, or raise the timeout")
            if model is not None and ("unknown model" in message or "NOT_FOUND" in status or status == "404"):
                return FireClientError(
                    f"model {model!r} is not loaded on {self.endpoint.address}: pass --model one of "
                    f"{', '.join(MODELS)} (and check the server's model list)"
                )
            return FireClientError(f"{self.endpoint.address}: server refused the request: {message}")
        return FireClientError(f"{self.endpoint.address}: {_short(exc)}")

    def _call(self, fn, *args, model: str | None = None, **kwargs):
        if self._client is None:
            raise FireClientError("client is closed")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tritonclient raises InferenceServerException, geventhttpclient OSError
            raise self._translate(exc, model) from exc

    # -- metadata --------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:
            return False

    def server_metadata(self) -> dict[str, Any]:
        """{'name': 'triton', 'version': '2.51.0', 'extensions': [...]}."""
        if self.protocol == "grpc":
            return dict(self._call(self._client.get_server_metadata, as_json=True))
        return dict(self._call(self._client.get_server_metadata))

    def model_info(self, model: str = DEFAULT_MODEL) -> ModelInfo:
        """Max batch size, per-sample input shape and output names, from the model's config (cached)."""
        if model not in self._info:
            if self.protocol == "grpc":
                config = self._call(self._client.get_model_config, model, as_json=True, model=model)["config"]
            else:
                config = self._call(self._client.get_model_config, model, model=model)
            inputs = {i["name"]: i for i in config.get("input", [])}
            if INPUT_NAME not in inputs:
                raise FireClientError(f"model {model!r} has no {INPUT_NAME} input: pass --model one of {MODELS}")
            self._info[model] = ModelInfo(
                name=model,
                max_batch_size=int(config.get("max_batch_size", 0)),
                input_shape=tuple(int(d) for d in inputs[INPUT_NAME].get("dims", [])),
                outputs=tuple(o["name"] for o in config.get("output", []) if o["name"] in OUTPUT_FIELDS),
            )
        return self._info[model]

    # -- inference -------------------------------------------------------------------------------

    def infer(self, images: np.ndarray, model: str = DEFAULT_MODEL, bypass: bool = False) -> InferResult:
        """One request with all ``images`` (uint8 NHWC or float NCHW in [0, 1]); at most the model's max batch.

        ``bypass=True`` asks fire_ensemble to skip the repair for this request (ignored by other models).
        """
        x = to_model_input(images)
        info = self.model_info(model)
        if info.input_shape and tuple(x.shape[1:]) != info.input_shape:
            raise FireClientError(
                f"images are {list(x.shape[1:])} (C, H, W) but {model} expects {list(info.input_shape)}: "
                "export images for this model's data set (`fire data export --checkpoint ...`)"
            )
        if info.max_batch_size and len(x) > info.max_batch_size:
            raise FireClientError(f"{len(x)} images in one request but {model} takes at most "
                                  f"{info.max_batch_size}: use infer_batches or a smaller --batch")
        m = self._module
        inp = m.InferInput(INPUT_NAME, list(x.shape), "FP32")
        if self.protocol == "http":
            inp.set_data_from_numpy(x, binary_data=True)
            outputs = [m.InferRequestedOutput(name, binary_data=True) for name in info.outputs]
        else:
            inp.set_data_from_numpy(x)
            outputs = [m.InferRequestedOutput(name) for name in info.outputs]
        parameters = {BYPASS_PARAMETER: True} if bypass else None
        if self.protocol == "grpc":
            response = self._call(self._client.infer, model, [inp], outputs=outputs, parameters=parameters,
                                  client_timeout=self.timeout_s, model=model)
        else:
            response = self._call(self._client.infer, model, [inp], outputs=outputs, parameters=parameters,
                                  model=model)
        return InferResult.from_outputs(model, {name: response.as_numpy(name) for name in OUTPUT_FIELDS})

    def infer_batches(self, images: np.ndarray, batch: int = 1, model: str = DEFAULT_MODEL,
                      bypass: bool = False) -> InferResult:
        """All ``images`` in requests of at most ``batch`` images each (1 = one by one), results concatenated."""
        return InferResult.concat(list(self.iter_batches(images, batch, model, bypass)))

    def iter_batches(self, images: np.ndarray, batch: int = 1, model: str = DEFAULT_MODEL,
                     bypass: bool = False) -> Iterator[InferResult]:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        x = to_model_input(images)
        if len(x) == 0:
            raise ValueError("no images to send")
        for start in range(0, len(x), batch):
            yield self.infer(x[start:start + batch], model, bypass)


def init_grpc_gevent() -> bool:
    """Make gRPC cooperate with gevent (Locust): without it every gRPC call blocks the whole gevent hub.

    Must run in each process before its first gRPC channel exists; idempotent. Returns False when gevent is
    not installed.
    """
    try:
        import gevent  # noqa: F401
        import grpc.experimental.gevent as grpc_gevent
    except ImportError:
        return False
    grpc_gevent.init_gevent()
    return True


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    return first if len(first) <= 200 else first[:197] + "..."


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_URL",
    "MODELS",
    "PROTOCOLS",
    "Endpoint",
    "FireClient",
    "FireClientError",
    "Images",
    "InferResult",
    "ModelInfo",
    "ServerUnreachable",
    "init_grpc_gevent",
    "load_digits",
    "load_npz",
    "load_pngs",
    "parse_url",
    "to_model_input",
]
