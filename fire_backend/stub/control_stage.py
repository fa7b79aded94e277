"""Triton adapter of the control endpoint: ``fire_control`` requests in, :class:`Controller` actions, responses out.

The latents of observed images (at every configured layer, and the predictions the label-free ranking needs) are
computed in this process, with the same network code and weights file as the serving stages (there is no head to
call in the ``fused`` layout, and no BLS round trip in any), in chunks of the repository's max batch size, on
this instance's device (the GPU with ``fire repo build --gpu``).
``pb_utils`` is passed in; this module imports no Triton.

Every refusal is INVALID_ARG with the Controller's one-line message. Anything else that goes wrong is logged here
with its traceback, and the client gets a generic INTERNAL error: no traceback, no server paths.

Each action is counted on /metrics by action and result (:class:`~fire_backend.stub.metrics.ControlMetrics`),
with the store damage the controller meets and the store's committed live version.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from fire_backend.metric_families import RESULT_ERROR, RESULT_OK, RESULT_REFUSED_AUTH, RESULT_REFUSED_VALIDATION
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings, repository_store, resolve_artifacts
from fire_backend.stub.controller import ACTIONS, AuthRefused, ControlError, Controller, action_of
from fire_backend.stub.metrics import ControlMetrics
from fire_backend.stub.stages import instance_device, limit_threads, load_network
from fire_backend.stub.tensors import from_triton
from fire_backend.wire.names import FIRE_CONTROL, IMAGES, REQUEST, RESPONSE, TOKEN
from fire_backend.wire.token import read_token

LOG = logging.getLogger("fire_backend.control")

#: a refused REQUEST (perhaps unauthenticated: the size check and the credential come first) is parsed for its
#: ``action`` label only up to this size, so refusing stays cheap; a larger refused one counts as action "other"
REFUSED_LABEL_BYTES = 4096


class ControlStage:
    """Adapter between Triton requests and the Controller (one request at a time: max_batch_size 0)."""

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        limit_threads(int(params.get("torch_threads", "1")))
        artifacts = resolve_artifacts(args["model_repository"], params.get("artifacts_dir", ARTIFACTS_DIR))
        settings = ServingSettings.read(artifacts)
        self.device = instance_device(args)
        self.max_batch = settings.max_batch_size
        network = load_network(artifacts, self.device)
        self.network, self.layer = network, settings.layer
        # The gauges read the store through an object of its own: damage is the controller's to report.
        watched = repository_store(artifacts, settings)

        def store_view() -> tuple[int | None, bool]:
            state = watched.resolve()
            return state.version, state.degraded

        self.metrics = ControlMetrics(pb_utils, args["model_name"], args.get("model_instance_name", args["model_name"]),
                                      ACTIONS, store_view=store_view)
        self.controller = Controller(artifacts, read_token(), self._latents, network,
                                     on_damage=self.metrics.store_error)

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """Unrepaired latents at the split layer, as the serving stages compute them (CPU float32 out)."""
        parts = []
        with torch.inference_mode():
            for start in range(0, len(images), self.max_batch):
                chunk = images[start : start + self.max_batch].to(self.device)
                parts.append(self.network.latents(chunk, self.layer).cpu())
        return torch.cat(parts).clone()

    def _bytes(self, request: Any, name: str) -> bytes:
        """The one element of a TYPE_STRING input, as bytes."""
        tensor = self.pb.get_input_tensor_by_name(request, name)
        values = tensor.as_numpy().reshape(-1) if tensor is not None else ()
        if len(values) != 1:
            raise ControlError(f"{name} must hold exactly one string")
        value = values[0]
        return value if isinstance(value, bytes) else str(value).encode()

    def _one(self, request: Any, raw: bytes) -> Any:
        credential = self._bytes(request, TOKEN)
        images_tensor = self.pb.get_input_tensor_by_name(request, IMAGES)
        images = from_triton(images_tensor, torch.device("cpu")).numpy() if images_tensor is not None else None
        result = self.controller.handle(raw, credential, images)
        payload = np.array([json.dumps(result).encode()], dtype=np.object_)
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(RESPONSE, payload)])

    def serving(self) -> AbstractContextManager[None]:
        """What wraps each ``execute``: the metrics' turn to talk to Triton."""
        return self.metrics.serving()

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            raw = None
            try:
                raw = self._bytes(request, REQUEST)
                responses.append(self._one(request, raw))
                result = RESULT_OK
            except AuthRefused as exc:
                LOG.warning("control action refused: %s", exc)
                responses.append(self._error(str(exc), self.pb.TritonError.INVALID_ARG))
                result = RESULT_REFUSED_AUTH
            except ControlError as exc:
                LOG.warning("control action refused: %s", exc)
                responses.append(self._error(str(exc), self.pb.TritonError.INVALID_ARG))
                result = RESULT_REFUSED_VALIDATION
            except Exception:  # a bug or a damaged store: the log gets the traceback, the client a generic line
                LOG.exception("control action failed")
                responses.append(self._error(f"{FIRE_CONTROL}: internal error; the server log has the details",
                                             self.pb.TritonError.INTERNAL))
                result = RESULT_ERROR
            labelled = raw is not None and (result == RESULT_OK or len(raw) <= REFUSED_LABEL_BYTES)
            self.metrics.control((action_of(raw) if labelled else None) or "", result)
        return responses

    def _error(self, message: str, code: Any) -> Any:
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def finalize(self) -> None:
        self.metrics.close()
