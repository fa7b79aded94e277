"""One tritonclient connection (gRPC or HTTP) to one server, shared by the inference and the control client.

It hides the two protocols' differences (module, timeouts, binary HTTP tensors) and routes every call through
the one error translation (:mod:`fire_backend.wire.errors`). tritonclient's submodules are imported on first
use, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fire_backend.wire.endpoints import Endpoint, parse_url
from fire_backend.wire.errors import FireClientError, translate
from fire_backend.wire.names import DEFAULT_URL


class Connection:
    """A tritonclient client for ``url`` (``grpc://H:P``, ``http://H:P`` or bare ``H:P`` with ``protocol``).

    One connection, not thread-safe: one per user or thread. Under gevent (Locust) call
    :func:`fire_backend.wire.client.init_grpc_gevent` before the first gRPC connection is made.
    """

    def __init__(self, url: str = DEFAULT_URL, protocol: str | None = None, timeout_s: float = 60.0) -> None:
        self.endpoint: Endpoint = parse_url(url, protocol)
        self.timeout_s = float(timeout_s)
        if self.protocol == "grpc":
            import tritonclient.grpc as module

            self._client = module.InferenceServerClient(self.endpoint.address)
        else:
            import tritonclient.http as module

            self._client = module.InferenceServerClient(
                self.endpoint.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
        self._module = module

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

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -----------------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any, model: str | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the tritonclient client, its errors translated (``model``: for the message)."""
        if self._client is None:
            raise FireClientError("client is closed")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tritonclient raises InferenceServerException, geventhttpclient OSError
            raise translate(exc, self.endpoint.address, self.protocol, self.timeout_s, model) from exc

    def model_config(self, model: str) -> dict[str, Any]:
        """The model's config as a dict (the same shape over both protocols)."""
        if self.protocol == "grpc":
            return self._call(self._client.get_model_config, model, as_json=True, model=model)["config"]
        return self._call(self._client.get_model_config, model, model=model)

    def server_metadata(self) -> dict[str, Any]:
        """{'name': 'triton', 'version': '2.51.0', 'extensions': [...]}."""
        if self.protocol == "grpc":
            return dict(self._call(self._client.get_server_metadata, as_json=True))
        return dict(self._call(self._client.get_server_metadata))

    def tensor(self, name: str, array: np.ndarray, datatype: str) -> Any:
        """An input tensor of this protocol (binary over HTTP)."""
        tensor = self._module.InferInput(name, list(array.shape), datatype)
        if self.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def request(self, model: str, inputs: list[Any], outputs: Sequence[str] = (),
                parameters: dict[str, Any] | None = None) -> Any:
        """One inference request; ``outputs`` names the outputs to return (all when empty)."""
        m = self._module
        if self.protocol == "http":
            requested = [m.InferRequestedOutput(name, binary_data=True) for name in outputs] or None
            return self._call(self._client.infer, model, inputs, outputs=requested, parameters=parameters,
                             model=model)
        requested = [m.InferRequestedOutput(name) for name in outputs] or None
        return self._call(self._client.infer, model, inputs, outputs=requested, parameters=parameters,
                         client_timeout=self.timeout_s, model=model)
