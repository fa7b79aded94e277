"""Triton adapter of the control endpoint: ``fire_control`` requests in, :class:`Controller` actions, responses out.

The head latents of observed images come from the served head itself (a BLS call to ``fire_head``), so online
learning sees exactly what the repair stage sees. ``pb_utils`` is passed in; this module imports no Triton.

Every refusal is INVALID_ARG with the Controller's one-line message. Anything else that goes wrong is logged here
with its traceback, and the client gets a generic INTERNAL error: no traceback, no server paths.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from fire_backend.serving.artifacts import ARTIFACTS_DIR, resolve_artifacts
from fire_backend.serving.controller import ControlError, Controller
from fire_backend.wire.names import FIRE_CONTROL, FIRE_HEAD, IMAGE, IMAGES, LATENT, REQUEST, RESPONSE, TOKEN
from fire_backend.wire.token import read_token

LOG = logging.getLogger("fire_backend.control")


class ControlStage:
    """Adapter between Triton requests and the Controller (one request at a time: max_batch_size 0)."""

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        artifacts = resolve_artifacts(args["model_repository"], params.get("artifacts_dir", ARTIFACTS_DIR))
        self.max_batch = 64
        self.controller = Controller(artifacts, read_token(), self._head_latents)

    def _head_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Latents from the served head itself (BLS), so learning sees exactly what repair sees."""
        parts = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch].contiguous().numpy()
            response = self.pb.InferenceRequest(
                model_name=FIRE_HEAD, requested_output_names=[LATENT], inputs=[self.pb.Tensor(IMAGE, chunk)]
            ).exec()
            if response.has_error():
                raise ControlError(f"head stage failed: {response.error().message()}")
            parts.append(torch.from_numpy(self.pb.get_output_tensor_by_name(response, LATENT).as_numpy().copy()))
        return torch.cat(parts)

    def _bytes(self, request: Any, name: str) -> bytes:
        """The one element of a TYPE_STRING input, as bytes."""
        tensor = self.pb.get_input_tensor_by_name(request, name)
        values = tensor.as_numpy().reshape(-1) if tensor is not None else ()
        if len(values) != 1:
            raise ControlError(f"{name} must hold exactly one string")
        value = values[0]
        return value if isinstance(value, bytes) else str(value).encode()

    def _one(self, request: Any) -> Any:
        raw = self._bytes(request, REQUEST)
        credential = self._bytes(request, TOKEN)
        images_tensor = self.pb.get_input_tensor_by_name(request, IMAGES)
        images = images_tensor.as_numpy() if images_tensor is not None else None
        result = self.controller.handle(raw, credential, images)
        payload = np.array([json.dumps(result).encode()], dtype=np.object_)
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(RESPONSE, payload)])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except ControlError as exc:
                LOG.warning("control action refused: %s", exc)
                responses.append(self._error(str(exc), self.pb.TritonError.INVALID_ARG))
            except Exception:  # a bug or a damaged store: the log gets the traceback, the client a generic line
                LOG.exception("control action failed")
                responses.append(self._error(f"{FIRE_CONTROL}: internal error; the server log has the details",
                                             self.pb.TritonError.INTERNAL))
        return responses

    def _error(self, message: str, code: Any) -> Any:
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def finalize(self) -> None:
        return None
