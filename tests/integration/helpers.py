"""Small tritonclient helpers for the integration tests."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

OUTPUTS = ("LOGITS", "LABEL", "REPAIR_SCORE", "FLAGGED", "DIRECTION_VERSION")


def infer(client, images: np.ndarray, model: str = "fire_ensemble", bypass: bool = False,
          dtype: str = "FP32") -> dict[str, np.ndarray]:
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    tensor = module.InferInput("IMAGE", list(images.shape), dtype)
    tensor.set_data_from_numpy(images)
    params = {"fire_bypass": True} if bypass else None
    result = client.infer(model, [tensor], parameters=params)
    names = [o.name if hasattr(o, "name") else o["name"] for o in
             (result.get_response().outputs if module is grpcclient else result.get_response()["outputs"])]
    return {name: result.as_numpy(name) for name in names}


def labels(client, images: np.ndarray, model: str = "fire_ensemble", bypass: bool = False,
           batch: int = 64) -> np.ndarray:
    return np.concatenate([infer(client, images[i : i + batch], model, bypass)["LABEL"].reshape(-1)
                           for i in range(0, len(images), batch)])
