"""The inference client of a FIRE server, shared by ``fire infer``, ``fire bench``, the Locust users and the tests.

A small typed client over tritonclient's gRPC and HTTP clients for the inference models of a FIRE repository
(``fire_ensemble``, ``undefended_ensemble``, ``fire_monolithic``). Kept light on purpose: numpy and tritonclient
only, no torch, so Locust workers stay small.

    with FireClient("grpc://127.0.0.1:8001") as client:
        result = client.infer(load_npz("clean.npz").x)          # uint8 NHWC or float NCHW
        print(result.labels, result.flagged, result.scores, result.versions)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fire_backend.wire.auth import BYPASS, digest, sign
from fire_backend.wire.connection import Connection
from fire_backend.wire.errors import FireClientError
from fire_backend.wire.images import to_model_input
from fire_backend.wire.names import (
    BYPASS_PARAMETER,
    CREDENTIAL_PARAMETER,
    DEFAULT_MODEL,
    DIRECTION_VERSION,
    FLAGGED,
    IMAGE,
    INFERENCE_MODELS,
    LABEL,
    LOGITS,
    REPAIR_SCORE,
)
from fire_backend.wire.token import TOKEN_ENV, TOKEN_FILE_ENV, read_token

#: output name -> InferResult field; outputs a model lacks stay None.
OUTPUT_FIELDS = {
    LABEL: "labels",
    LOGITS: "logits",
    FLAGGED: "flagged",
    REPAIR_SCORE: "scores",
    DIRECTION_VERSION: "versions",
}


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

        labels = flat(LABEL, np.int64)
        if labels is None:
            raise FireClientError(f"model {model!r} returned no {LABEL} output: is it a FIRE repository model?")
        logits = outputs.get(LOGITS)
        return cls(labels=labels, logits=None if logits is None else np.asarray(logits, np.float32),
                   flagged=flat(FLAGGED, bool), scores=flat(REPAIR_SCORE, np.float32),
                   versions=flat(DIRECTION_VERSION, np.int64), model=model)

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


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_batch_size: int
    input_shape: tuple[int, ...]
    outputs: tuple[str, ...]


class FireClient(Connection):
    """Inference on a FIRE server's models over one gRPC or HTTP connection (see :class:`Connection`).

    ``token``: the control token that signs bypass requests (default: :func:`~fire_backend.wire.token.read_token`
    when a bypass is first asked for). It never travels: each bypass request carries a credential bound to its
    images and the time (:mod:`fire_backend.wire.auth`).
    """

    def __init__(self, *args: Any, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._info: dict[str, ModelInfo] = {}
        self._token = token

    def __enter__(self) -> FireClient:
        return self

    def model_info(self, model: str = DEFAULT_MODEL) -> ModelInfo:
        """Max batch size, per-sample input shape and output names, from the model's config (cached)."""
        if model not in self._info:
            config = self.model_config(model)
            inputs = {i["name"]: i for i in config.get("input", [])}
            if IMAGE not in inputs:
                raise FireClientError(f"model {model!r} has no {IMAGE} input: pass --model one of {INFERENCE_MODELS}")
            self._info[model] = ModelInfo(
                name=model,
                max_batch_size=int(config.get("max_batch_size", 0)),
                input_shape=tuple(int(d) for d in inputs[IMAGE].get("dims", [])),
                outputs=tuple(o["name"] for o in config.get("output", []) if o["name"] in OUTPUT_FIELDS),
            )
        return self._info[model]

    def infer(self, images: np.ndarray, model: str = DEFAULT_MODEL, bypass: bool = False,
              outputs: Collection[str] | None = None) -> InferResult:
        """One request with all ``images`` (uint8 NHWC or float NCHW in [0, 1]); at most the model's max batch.

        ``bypass=True`` asks fire_ensemble to skip the repair for this request (ignored by models that do not repair);
        the server honours it only when its repository allows bypass, and the request is signed with the token.
        ``outputs``: ask only for these of the model's outputs (LABEL always comes; the result's other fields are
        None), which the server then does not build; default: every output the model has.
        """
        x = np.ascontiguousarray(to_model_input(images), dtype=np.float32)
        info = self.model_info(model)
        if info.input_shape and tuple(x.shape[1:]) != info.input_shape:
            raise FireClientError(
                f"images are {list(x.shape[1:])} (C, H, W) but {model} expects {list(info.input_shape)}: "
                "export images for this model's data set (`fire data export --checkpoint ...`)"
            )
        if info.max_batch_size and len(x) > info.max_batch_size:
            raise FireClientError(f"{len(x)} images in one request but {model} takes at most "
                                  f"{info.max_batch_size}: use infer_batches or a smaller --batch")
        parameters = self._bypass_parameters(x) if bypass else None
        wanted = info.outputs if outputs is None else [n for n in info.outputs if n == LABEL or n in outputs]
        response = self.request(model, [self.tensor(IMAGE, x, "FP32")], wanted, parameters)
        return InferResult.from_outputs(model, {name: response.as_numpy(name) for name in OUTPUT_FIELDS})

    def _bypass_parameters(self, x: np.ndarray) -> dict[str, Any]:
        """fire_bypass with its credential: signed over exactly the IMAGE bytes this request sends."""
        if self._token is None:
            try:
                self._token = read_token()
            except ValueError as exc:
                raise FireClientError(str(exc)) from None
        if not self._token:
            raise FireClientError(f"a bypass request must be signed with the control token: set {TOKEN_ENV} or "
                                  f"{TOKEN_FILE_ENV}")
        return {BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: sign(self._token, BYPASS, digest(x.tobytes()))}

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
