"""The operator's client of the control endpoint (model ``fire_control``): status, history, push, observe, rollback.

Talks to the server's gRPC endpoint (or its HTTP front, unless HTTP inference is closed). The token never
leaves this process: each request carries a credential made with it for exactly that request
(:mod:`fire_backend.wire.auth`), which the server checks and accepts once. See :mod:`fire_backend.wire.token`
for where the token is read. Errors arrive as FireClientError, translated once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fire_backend.wire.auth import CONTROL, digest, sign
from fire_backend.wire.connection import Connection
from fire_backend.wire.errors import FireClientError
from fire_backend.wire.images import open_npz
from fire_backend.wire.names import (
    DEFAULT_URL,
    FIRE_CONTROL,
    IMAGES,
    MAX_CONTROL_REQUEST_BYTES,
    OBSERVE_CHUNK_IMAGES,
    REQUEST,
    RESPONSE,
    TOKEN,
)


class ControlClient(Connection):
    """The control actions over one connection to ``url`` (``grpc://H:P``, ``http://H:P`` or bare ``H:P``)."""

    def __init__(self, url: str = DEFAULT_URL, token: str = "", timeout_s: float = 60.0) -> None:
        super().__init__(url, timeout_s=timeout_s)
        self.token = token
        self._image_shape: tuple[int, ...] | None = None

    def __enter__(self) -> ControlClient:
        return self

    def image_shape(self) -> tuple[int, ...] | None:
        """The H x W x C of the images ``observe`` takes, from fire_control's config (the server checks the same);
        None where the config leaves it open."""
        if self._image_shape is None:
            inputs = {i["name"]: i for i in self.model_config(FIRE_CONTROL).get("input", [])}
            dims = tuple(int(d) for d in inputs.get(IMAGES, {}).get("dims", []))[1:]  # after the image count
            self._image_shape = dims if len(dims) == 3 and min(dims) > 0 else ()
        return self._image_shape or None

    def call(self, request: dict[str, Any], images: np.ndarray | None = None) -> dict[str, Any]:
        """Send one JSON action (with images for ``observe``), signed; the server's JSON answer."""
        body = json.dumps(request).encode()
        pixels = None if images is None else _pixels(images)
        # Without a token there is nothing to sign with: the empty credential lets the server say so.
        credential = sign(self.token, CONTROL, digest(body, b"" if pixels is None else pixels.tobytes())) \
            if self.token else ""
        inputs = [self.tensor(name, np.array([value], dtype=np.object_), "BYTES")
                  for name, value in ((REQUEST, body), (TOKEN, credential.encode()))]
        if pixels is not None:
            inputs.append(self.tensor(IMAGES, pixels, "UINT8"))
        result = self.request(FIRE_CONTROL, inputs)
        raw = result.as_numpy(RESPONSE).reshape(-1)[0]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)

    def status(self) -> dict[str, Any]:
        return self.call({"action": "status"})

    def history(self) -> dict[str, Any]:
        return self.call({"action": "history"})

    def rollback(self, version: int) -> dict[str, Any]:
        return self.call({"action": "rollback", "version": version})

    def push(self, directions: list[dict[str, Any]], center: list[float] | None = None,
             layer: str | None = None, force: bool = False) -> dict[str, Any]:
        """Replace the direction set at ``layer`` (default: the split layer); the other layers' sets are kept.
        ``force``: commit even when the set changes more of the clean reserve's predictions than allowed."""
        request: dict[str, Any] = {"action": "push", "directions": directions, "center": center, "layer": layer}
        if force:
            request["force"] = True
        return self.call(request)

    def observe(self, images: np.ndarray, clean: bool = False, estimator: str | None = None,
                publish_every: int | None = None, chunk: int = OBSERVE_CHUNK_IMAGES) -> dict[str, Any]:
        """Fold ``images`` (uint8 N x H x W x C) into the live estimate, in requests of at most ``chunk`` images and
        MAX_CONTROL_REQUEST_BYTES each, one after the other; the last request's answer, with ``versions`` listing
        every version committed and ``requests`` how many were sent.

        Each request commits on its own: a request refused after others committed raises FireClientError naming
        what was committed (the server's ``history`` has it too).
        """
        request: dict[str, Any] = {"action": "observe", "clean": clean}
        if estimator:
            request["estimator"] = estimator
        if publish_every:
            request["publish_every"] = publish_every
        pixels = _pixels(images)
        expected = self.image_shape()
        if expected and tuple(pixels.shape[1:]) != expected:
            raise FireClientError(
                f"images are {' x '.join(map(str, pixels.shape[1:]))} (H x W x C) but this server's model takes "
                f"{' x '.join(map(str, expected))}: export images for its data set (`fire data export "
                "--checkpoint ...`)")
        per_request = observe_chunk(pixels, len(json.dumps(request).encode()), chunk)
        versions: list[int] = []
        result: dict[str, Any] = {}
        starts = range(0, len(pixels), per_request)
        for n, start in enumerate(starts):
            try:
                result = self.call(request, pixels[start:start + per_request])
            except FireClientError as exc:
                if not versions:
                    raise
                raise FireClientError(f"observe: request {n + 1} of {len(starts)} (images {start} to "
                                      f"{min(start + per_request, len(pixels)) - 1}) failed after versions "
                                      f"{versions} were committed from images 0 to {start - 1}: {exc}") from exc
            versions += result.get("versions", [result["version"]])
        return {**result, "versions": versions, "requests": len(starts)}


def _pixels(images: np.ndarray) -> np.ndarray:
    """``images`` as a contiguous uint8 N x H x W x C array; ValueError for anything else. Never cast: float images
    in [0, 1] or int16 would silently become other pixels the server learns from."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        shown = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"images must be uint8 N x H x W x C (as `fire data export` writes), got {shown}")
    return np.ascontiguousarray(images)


def observe_chunk(images: np.ndarray, request_bytes: int, chunk: int = OBSERVE_CHUNK_IMAGES) -> int:
    """How many of ``images`` one observe request carries: at most ``chunk``, and within
    MAX_CONTROL_REQUEST_BYTES together with the ``request_bytes`` of its JSON. ValueError when not even one fits."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 image, got {chunk}")
    if len(images) == 0:
        raise ValueError("observe needs at least one image")
    per_image = images[0].nbytes
    fits = (MAX_CONTROL_REQUEST_BYTES - request_bytes) // max(per_image, 1)
    if fits < 1:
        raise ValueError(f"one image of {list(images.shape[1:])} is {per_image} bytes: a control request carries "
                         f"at most {MAX_CONTROL_REQUEST_BYTES} bytes")
    return min(chunk, fits)


def read_direction_file(path: Path) -> tuple[list[dict[str, Any]], list[float] | None]:
    """An .npz with ``beta`` (D or K x D, or K x latent shape) and optional per-direction ``alpha``,
    ``mode``, ``threshold``, ``name`` arrays and a ``center``."""
    with open_npz(path, "direction file (beta, ...)") as data:
        if "beta" not in data.files:
            raise ValueError(f"{path}: needs an array 'beta' (has {', '.join(data.files)})")
        beta = np.asarray(data["beta"], dtype=np.float32)
        betas = beta.reshape(1, -1) if beta.ndim == 1 else beta.reshape(beta.shape[0], -1)
        count = len(betas)

        def column(name: str) -> list | None:
            if name not in data.files:
                return None
            values = np.atleast_1d(data[name]).tolist()
            if len(values) != count:
                raise ValueError(f"{path}: '{name}' has {len(values)} entries for {count} directions")
            return values

        alphas, modes, thresholds, names = (column(n) for n in ("alpha", "mode", "threshold", "name"))
        center = data["center"].astype(np.float32).reshape(-1).tolist() if "center" in data.files else None
    directions = []
    for i in range(count):
        entry: dict[str, Any] = {"beta": betas[i].tolist(), "name": names[i] if names else f"pushed-{i}"}
        if alphas:
            entry["alpha"] = float(alphas[i])
        if modes:
            entry["mode"] = str(modes[i])
        if thresholds:
            entry["threshold"] = float(thresholds[i])
        directions.append(entry)
    return directions, center
