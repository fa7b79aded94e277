"""A faithful double of the parts of ``triton_python_backend_utils`` the stages use, for in-process stage tests.

It keeps Triton's contract where the stages depend on it: a tensor in GPU memory refuses ``as_numpy()`` with
Triton's own message and is only reachable through DLPack; ``is_cpu()`` tells which; request parameters arrive as
a JSON string; errors carry a code; the custom-metrics API is pb_metrics_double's (one simulated server, ``METRICS``,
for the process). No GPU is involved: a "GPU" tensor holds CPU memory behind the same interface.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.utils.dlpack
from pb_metrics_double import PbMetrics

#: the server's /metrics as this process's stages export to it
METRICS = PbMetrics()
MetricFamily = METRICS.MetricFamily


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE = 0, 1, 2, 3, 4

    def __init__(self, message: str, code: int = 0) -> None:
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class TritonModelException(Exception):
    pass


class Tensor:
    def __init__(self, name: str, array: Any, on_gpu: bool = False) -> None:
        self._name, self.array, self.on_gpu = name, np.asarray(array), on_gpu

    def name(self) -> str:
        return self._name

    def is_cpu(self) -> bool:
        return not self.on_gpu

    def as_numpy(self) -> np.ndarray:
        if self.on_gpu:
            raise TritonModelException("Tensor is stored in GPU and cannot be converted to NumPy.")
        return self.array

    def to_dlpack(self) -> Any:
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self.array))

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> Tensor:
        return cls(name, torch.utils.dlpack.from_dlpack(capsule).numpy(), on_gpu=True)


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
        self.output_tensors, self.error = output_tensors, error

    def outputs(self) -> dict[str, np.ndarray]:
        return {t.name(): t.array for t in self.output_tensors}


class InferenceRequest:
    """A request as a stage sees it: named input tensors, a JSON parameters string, and the outputs it asks for.

    ``requested`` None stands for a client that named no outputs: Triton then lists every output of the model
    (here: every output name the wire layer defines, a superset of any stage's).
    """

    def __init__(self, inputs: dict[str, Tensor], parameters: dict[str, Any] | None = None,
                 requested: list[str] | None = None) -> None:
        from fire_backend.wire import names

        everything = [names.LOGITS, names.LABEL, names.LATENT, names.REPAIRED, names.REPAIR_SCORE, names.FLAGGED,
                      names.DIRECTION_VERSION]
        self.inputs, self._parameters = inputs, parameters or {}
        self._requested = everything if requested is None else list(requested)

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def requested_output_names(self) -> list[str]:
        return list(self._requested)


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return request.inputs.get(name)


def image_request(x: np.ndarray, on_gpu: bool = False, requested: list[str] | None = None,
                  **parameters: Any) -> InferenceRequest:
    from fire_backend.wire.names import IMAGE

    return InferenceRequest({IMAGE: Tensor(IMAGE, x, on_gpu)}, parameters, requested)
