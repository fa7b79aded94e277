"""Small tritonclient helpers for the integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from fire_backend.repository.build import RepositoryOptions
from fire_backend.wire.auth import BYPASS, digest, sign
from fire_backend.wire.names import BYPASS_PARAMETER, CREDENTIAL_PARAMETER, FIRE_ENSEMBLE, FIRE_INLINE, FIRE_SEPARATE

OUTPUTS = ("LOGITS", "LABEL", "REPAIR_SCORE", "FLAGGED", "DIRECTION_VERSION")
#: the defended model in every layout, as the session server serves them
DEFENDED = (FIRE_ENSEMBLE, FIRE_INLINE, FIRE_SEPARATE)
#: the session server's repository: every layout beside fire_ensemble (fused), the baselines, signed bypass allowed
EVERY_LAYOUT = RepositoryOptions(compare_layouts=("inline", "separate"), baselines=True, allow_bypass=True)


def bypass_parameters(images: np.ndarray, token: str) -> dict:
    """fire_bypass with a credential signed over exactly these images, as FireClient sends it."""
    payload = digest(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    return {BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: sign(token, BYPASS, payload)}


def infer(client, images: np.ndarray, model: str = FIRE_ENSEMBLE, bypass: str | None = None,
          dtype: str = "FP32", parameters: dict | None = None,
          outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """One request; ``bypass``: the control token to sign a fire_bypass request with; ``outputs``: the outputs to
    ask for (None: none named, so every one comes back); returns every output the response holds."""
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    tensor = module.InferInput("IMAGE", list(images.shape), dtype)
    tensor.set_data_from_numpy(images)
    params = bypass_parameters(images, bypass) if bypass else parameters
    requested = [module.InferRequestedOutput(name) for name in outputs] if outputs is not None else None
    result = client.infer(model, [tensor], parameters=params, outputs=requested)
    names = [o.name if hasattr(o, "name") else o["name"] for o in
             (result.get_response().outputs if module is grpcclient else result.get_response()["outputs"])]
    return {name: result.as_numpy(name) for name in names}


def labels(client, images: np.ndarray, model: str = FIRE_ENSEMBLE, bypass: str | None = None,
           batch: int = 64) -> np.ndarray:
    return np.concatenate([infer(client, images[i : i + batch], model, bypass)["LABEL"].reshape(-1)
                           for i in range(0, len(images), batch)])


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` every 10 ms until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
