"""Triton adapter of the control endpoint: ``fire_control`` requests in, :class:`Controller` actions, responses out.

The head latents of observed images come from the served head itself (a BLS call to ``fire_head``), so online
learning sees exactly what the repair stage sees. ``pb_utils`` is passed in; this module imports no Triton.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from fire_backend.serving.artifacts import ARTIFACTS_DIR, resolve_artifacts
from fire_backend.serving.controller import ControlError, Controller
from fire_backend.wire.names import FIRE_HEAD, IMAGE, IMAGES, LATENT, REQUEST, RESPONSE, TOKEN
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

    def _one(self, request: Any) -> Any:
        limits = self.controller.limits
        raw = self.pb.get_input_tensor_by_name(request, REQUEST).as_numpy().reshape(-1)[0]
        token_raw = self.pb.get_input_tensor_by_name(request, TOKEN).as_numpy().reshape(-1)[0]
        if len(raw) > limits.max_request_bytes:
            raise ControlError(f"request of {len(raw)} bytes; at most {limits.max_request_bytes}")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ControlError(f"{REQUEST} is not valid JSON") from None
        if not isinstance(body, dict):
            raise ControlError(f"{REQUEST} must be a JSON object")
        images_tensor = self.pb.get_input_tensor_by_name(request, IMAGES)
        images = images_tensor.as_numpy() if images_tensor is not None else None
        token = token_raw.decode() if isinstance(token_raw, bytes) else str(token_raw)
        result = self.controller.handle(body, token, images)
        payload = np.array([json.dumps(result).encode()], dtype=np.object_)
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(RESPONSE, payload)])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except ControlError as exc:
                LOG.warning("control action refused: %s", exc)
                responses.append(self.pb.InferenceResponse(
                    output_tensors=[], error=self.pb.TritonError(str(exc), self.pb.TritonError.INVALID_ARG)))
        return responses

    def finalize(self) -> None:
        return None
