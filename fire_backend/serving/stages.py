"""The logic of every Triton stage: batch assembly, validation, head/repair/tail compute.

Triton's Python backend hands ``execute()`` a list of requests (a dynamic batch). Each stage reads
every request's input, validates it on its own (a bad request gets its own INVALID_ARG error and
never fails its neighbours), concatenates the valid ones into one tensor, runs once, and splits the
result back. The Triton-facing ``pb_utils`` module is passed in, so this module imports no Triton.

Device: CPU by default (inputs arrive as numpy, ``torch.from_numpy`` wraps them without a copy);
on a GPU instance tensors move in and out through DLPack, so latents stay on the device between
head, repair and tail and the directions stay resident there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from fire_backend.fire import compile_directions, repair
from fire_backend.serving.artifacts import (
    ARTIFACTS_DIR,
    FULL_FILE,
    HEAD_FILE,
    STORE_DIR,
    TAIL_FILE,
    ServingSettings,
    resolve_artifacts,
)
from fire_backend.split import load_part
from fire_backend.store import DirectionStore, StoreFollower
from fire_backend.wire.names import (
    BYPASS_PARAMETER,
    DIRECTION_VERSION,
    FLAGGED,
    IMAGE,
    LABEL,
    LATENT,
    LOGITS,
    REPAIR_SCORE,
    REPAIRED,
)

LOG = logging.getLogger("fire_backend.serving")


class RequestError(ValueError):
    """This request is invalid; only it fails."""


def request_parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    if not raw:
        return {}
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def wants_bypass(request: Any) -> bool:
    value = request_parameters(request).get(BYPASS_PARAMETER, False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class Stage:
    """Common plumbing: configuration, device, thread settings, batch concat/split."""

    input_name = ""

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        self.params = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.name = args["model_name"]
        self.instance = args.get("model_instance_name", self.name)
        self.artifacts = resolve_artifacts(args["model_repository"], self.params.get("artifacts_dir", ARTIFACTS_DIR))
        self.settings = ServingSettings.read(self.artifacts)
        on_gpu = args.get("model_instance_kind") == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")
        threads = int(self.params.get("torch_threads", "1"))
        torch.set_num_threads(threads)
        if torch.get_num_interop_threads() != 1:
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # already set once in this process
                pass
        self.output_dtypes = {o["name"]: o["data_type"] for o in self.config.get("output", [])}

    # -- tensors in and out --------------------------------------------------------------
    def read(self, request: Any, name: str) -> torch.Tensor:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"missing input {name}")
        if self.device.type == "cuda":
            return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).to(self.device, non_blocking=True)
        return torch.from_numpy(tensor.as_numpy())

    def out(self, name: str, value: torch.Tensor) -> Any:
        if self.device.type == "cuda":
            return self.pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
        return self.pb.Tensor(name, value.contiguous().numpy())

    def error(self, message: str) -> Any:
        return self.pb.InferenceResponse(
            output_tensors=[], error=self.pb.TritonError(message, self.pb.TritonError.INVALID_ARG)
        )

    # -- the batch loop ----------------------------------------------------------------------
    def validate(self, batch: torch.Tensor) -> None:
        if batch.shape[0] == 0:
            raise RequestError(f"{self.input_name}: empty batch")

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        tensors: list[torch.Tensor] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            try:
                tensor = self.read(request, self.input_name)
                self.validate(tensor)
            except RequestError as exc:
                responses[index] = self.error(str(exc))
                continue
            tensors.append(tensor)
            owners.append(index)
        if tensors:
            batch = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
            sizes = [t.shape[0] for t in tensors]
            with torch.inference_mode():
                outputs = self.compute(batch, [requests[i] for i in owners], sizes)
            for position, owner in enumerate(owners):
                responses[owner] = self.pb.InferenceResponse(
                    output_tensors=[self.out(name, parts[position]) for name, parts in outputs.items()]
                )
        return responses

    def compute(self, batch: torch.Tensor, requests: list[Any], sizes: list[int]) -> dict[str, Sequence[torch.Tensor]]:
        raise NotImplementedError

    def finalize(self) -> None:
        return None


class HeadStage(Stage):
    """IMAGE [N, C, H, W] in [0, 1] -> LATENT."""

    input_name = IMAGE

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        super().__init__(args, pb_utils)
        self.net, _ = load_part(self.artifacts / HEAD_FILE, self.device)

    def validate(self, batch: torch.Tensor) -> None:
        super().validate(batch)
        expected = tuple(self.settings.input_shape)
        if tuple(batch.shape[1:]) != expected:
            raise RequestError(f"{IMAGE}: each sample must have shape {list(expected)}, got {list(batch.shape[1:])}")
        if not bool(torch.isfinite(batch).all()):
            raise RequestError(f"{IMAGE}: contains NaN or Inf values")
        if bool((batch < 0).any()) or bool((batch > 1).any()):
            raise RequestError(f"{IMAGE}: values must lie in [0, 1] (scale uint8 pixels by 1/255)")

    def compute(self, batch, requests, sizes):
        return {LATENT: self.net(batch.to(self.device)).split(sizes)}


class TailStage(Stage):
    """LATENT -> LOGITS [N, K], LABEL [N, 1]."""

    input_name = LATENT

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        super().__init__(args, pb_utils)
        self.net, _ = load_part(self.artifacts / TAIL_FILE, self.device)

    def compute(self, batch, requests, sizes):
        logits = self.net(batch.to(self.device))
        return {LOGITS: logits.split(sizes), LABEL: logits.argmax(1, keepdim=True).split(sizes)}


class MonolithicStage(HeadStage):
    """The whole model in one stage: the undefended, unsplit reference for benchmarks."""

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        Stage.__init__(self, args, pb_utils)
        self.net, _ = load_part(self.artifacts / FULL_FILE, self.device)

    def compute(self, batch, requests, sizes):
        logits = self.net(batch.to(self.device))
        return {LOGITS: logits.split(sizes), LABEL: logits.argmax(1, keepdim=True).split(sizes)}


class RepairStage(Stage):
    """LATENT -> REPAIRED, REPAIR_SCORE, FLAGGED, DIRECTION_VERSION, with the live direction set.

    Before each batch (never within one) one ``stat`` of the store's CURRENT pointer tells whether a
    new version was committed; if so it is verified, compiled onto the device, and used from this
    batch on. No model reload is involved.
    """

    input_name = LATENT

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        super().__init__(args, pb_utils)
        self.store = DirectionStore(self.artifacts / STORE_DIR).ensure()
        self.store.repair_pointer()
        self.follower = StoreFollower(self.store)
        self.instance_id = f"{self.instance}-{os.getpid()}".replace("/", "_").replace(" ", "_")
        self.compiled = compile_directions([], None, self.settings.latent_dim, self.device)
        self._refresh()

    def _refresh(self) -> None:
        if not self.follower.poll():
            return
        current = self.follower.current
        if current is None:
            self.compiled = compile_directions([], None, self.settings.latent_dim, self.device)
        else:
            ds = current.directions
            self.compiled = compile_directions(
                ds.directions, torch.from_numpy(ds.center), self.settings.latent_dim, self.device, current.number
            )
        self.store.report_instance(self.instance_id, self.follower.version)
        LOG.info("%s: applying direction version %d", self.instance_id, self.follower.version)

    def compute(self, batch, requests, sizes):
        self._refresh()
        latents = batch.to(self.device)
        repaired, score, flagged = repair(latents, self.compiled)
        version = torch.full((latents.shape[0], 1), self.follower.version, dtype=torch.int64, device=latents.device)
        bypass = [wants_bypass(r) for r in requests]
        parts = zip(latents.split(sizes), repaired.split(sizes), bypass, strict=True)
        return {
            REPAIRED: [raw if skip else fixed for raw, fixed, skip in parts],
            REPAIR_SCORE: score[:, None].split(sizes),
            FLAGGED: flagged[:, None].split(sizes),
            DIRECTION_VERSION: version.split(sizes),
        }

    def finalize(self) -> None:
        path = self.store.instances_dir / f"{self.instance_id}.json"
        if path.exists():
            path.unlink()

