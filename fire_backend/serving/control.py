"""The control endpoint's logic (model ``fire_control``): push, observe, status, history, rollback.

Reached through the same Triton endpoints as inference. Every action needs the control token
(compared in constant time, never logged); a rejected action changes nothing. The store is the only
state: each action reads the live version under the store lock, changes it, and commits, so several
control instances or servers on one shared store stay consistent and a crash loses nothing committed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fire_backend.evaluation import trigger_breaking_augmentations
from fire_backend.fire import AugmentedEstimator, Direction, RunningMean, UnpairedEstimator
from fire_backend.serving.artifacts import STORE_DIR, ServingSettings, resolve_artifacts
from fire_backend.serving.repository import load_centroid
from fire_backend.store import (
    DirectionSet,
    DirectionStore,
    EstimatorState,
    StoreError,
    validate_direction_set,
)

LOG = logging.getLogger("fire_backend.control")
TOKEN_ENV = "FIRE_CONTROL_TOKEN"
TOKEN_FILE_ENV = "FIRE_CONTROL_TOKEN_FILE"
LEARNED = "learned"
ACTIONS = ("status", "push", "observe", "rollback", "history")


class ControlError(ValueError):
    """The action is refused; nothing was changed."""


def server_token() -> str | None:
    path = os.environ.get(TOKEN_FILE_ENV)
    if path:
        token = Path(path).read_text().strip()
        return token or None
    return os.environ.get(TOKEN_ENV) or None


def token_id(token: str) -> str:
    """A short, non-reversible name for a token in the audit log."""
    return "tok-" + hashlib.sha256(token.encode()).hexdigest()[:10]


class Controller:
    """Triton-independent control logic; ``latents`` computes head latents for observed images."""

    def __init__(self, artifacts: Path, token: str | None, latents) -> None:
        self.artifacts = artifacts
        self.settings = ServingSettings.read(artifacts)
        self.store = DirectionStore(artifacts / STORE_DIR).ensure()
        self.store.initialize()
        self.store.repair_pointer()
        self.token = token
        self.latents = latents
        self.limits = self.settings.limits

    # -- entry point -----------------------------------------------------------------------
    def handle(self, request: dict[str, Any], token: str, images: np.ndarray | None) -> dict[str, Any]:
        """Authenticate, validate and run one action; raises ControlError with a clear message."""
        if self.token is None:
            raise ControlError("permission denied: the server has no control token configured "
                               f"(set {TOKEN_ENV} or {TOKEN_FILE_ENV} for `fire serve`)")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise ControlError("permission denied: missing or wrong control token")
        action = request.get("action")
        if action not in ACTIONS:
            raise ControlError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        actor = token_id(token)
        if action == "status":
            return self.status()
        if action == "history":
            return {"history": self.store.history()}
        if action == "rollback":
            return self.rollback(request, actor)
        if action == "push":
            return self.push(request, actor)
        return self.observe(request, images, actor)

    # -- read-only ---------------------------------------------------------------------------
    def _live(self) -> tuple[int, DirectionSet]:
        number = self.store.live_version()
        if number:
            return number, self.store.read_version(number).directions
        center, count = load_centroid(self.artifacts)
        return 0, DirectionSet(center.numpy(), [], None)

    def status(self) -> dict[str, Any]:
        number, ds = self._live()
        est = ds.estimator
        return {
            "version": number,
            "layer": self.settings.layer,
            "latent_shape": list(self.settings.latent_shape),
            "directions": [
                {"name": d.name, "alpha": d.alpha, "mode": d.mode, "threshold": d.threshold,
                 "norm": float(d.beta.norm())} for d in ds.directions
            ],
            "estimator": None if est is None else {
                "kind": est.kind, "poisoned_count": est.poisoned_count, "clean_count": est.clean_count},
            "publish_every": self.settings.publish_every,
            "instances": self.store.instances(),
        }

    # -- writers -----------------------------------------------------------------------------
    def rollback(self, request: dict[str, Any], actor: str) -> dict[str, Any]:
        version = request.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ControlError("rollback needs a version number >= 0")
        try:
            self.store.rollback(version, actor)
        except StoreError as exc:
            raise ControlError(str(exc)) from None
        return {"version": version, "action": "rollback"}

    def push(self, request: dict[str, Any], actor: str) -> dict[str, Any]:
        entries = request.get("directions")
        if not isinstance(entries, list) or not entries:
            raise ControlError("push needs a non-empty list 'directions'")
        dim = self.settings.latent_dim
        directions = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("beta"), list):
                raise ControlError(f"direction {i}: needs 'beta', a list of {dim} numbers")
            try:
                beta = torch.tensor(entry["beta"], dtype=torch.float32).reshape(-1)
                directions.append(Direction(
                    beta, float(entry.get("alpha", self.settings.default_alpha)), str(entry.get("mode", "projection")),
                    float(entry.get("threshold", self.settings.default_threshold)), str(entry.get("name", f"d{i}"))))
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ControlError(f"direction {i}: {exc}") from None
        with self.store.locked():
            _, live = self._live()
            center = live.center
            if request.get("center") is not None:
                try:
                    center = np.asarray(request["center"], dtype=np.float32).reshape(-1)
                except (TypeError, ValueError) as exc:
                    raise ControlError(f"center: {exc}") from None
            ds = DirectionSet(center, directions, live.estimator)
            self._validate(ds)
            number = self.store.commit(ds, "push", actor, {"directions": len(directions)})
        return {"version": number, "action": "push"}

    def observe(self, request: dict[str, Any], images: np.ndarray | None, actor: str) -> dict[str, Any]:
        clean = bool(request.get("clean", False))
        images = self._check_images(images)
        kind = str(request.get("estimator", self.settings.estimator))
        if kind not in ("unpaired", "augmented"):
            raise ControlError("estimator must be 'unpaired' or 'augmented'")
        every = int(request.get("publish_every", self.settings.publish_every))
        if every < 1:
            raise ControlError("publish_every must be >= 1")
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        latents = self.latents(batch).reshape(len(batch), -1)
        twins = None
        if kind == "augmented" and not clean:
            augs = trigger_breaking_augmentations(batch.shape[-1])
            twins = torch.stack([self.latents(a(batch)).reshape(len(batch), -1) for a in augs])
        versions = []
        with self.store.locked():
            _, live = self._live()
            estimator, centroid = self._estimator(live, kind)
            for start in range(0, len(batch), every):
                stop = min(start + every, len(batch))
                if clean:
                    centroid.update(latents[start:stop])
                elif kind == "unpaired":
                    estimator.observe(poisoned=latents[start:stop])
                else:
                    estimator.observe_augmented(latents[start:stop], list(twins[:, start:stop]))
                ds = self._learned_set(live, estimator, centroid)
                self._validate(ds)
                versions.append(self.store.commit(ds, "observe-clean" if clean else "observe", actor,
                                                  {"samples": stop - start, "estimator": kind}))
        state = self._learned_set(live, estimator, centroid).estimator
        return {"version": versions[-1], "versions": versions, "action": "observe",
                "poisoned_count": state.poisoned_count, "clean_count": state.clean_count}

    # -- helpers -------------------------------------------------------------------------------
    def _estimator(self, live: DirectionSet, kind: str):
        if live.estimator is not None and live.estimator.poisoned_count > 0:
            if live.estimator.kind != kind:
                raise ControlError(f"the live estimate is {live.estimator.kind!r}; observe with that estimator "
                                   "or roll back to version 0 to start over")
            return live.estimator.restore()
        center = torch.from_numpy(live.center)
        count = live.estimator.clean_count if live.estimator else load_centroid(self.artifacts)[1]
        centroid = RunningMean(center.numel(), center, count)
        if kind == "unpaired":
            estimator = UnpairedEstimator(center.numel(), center, count)
            estimator.clean = centroid
            return estimator, centroid
        return AugmentedEstimator(center.numel()), centroid

    def _learned_set(self, live: DirectionSet, estimator, centroid: RunningMean) -> DirectionSet:
        """The live set with the learned direction replaced by the estimator's current one."""
        kept = [d for d in live.directions if d.name != LEARNED]
        previous = next((d for d in live.directions if d.name == LEARNED), None)
        directions = list(kept)
        if estimator.count > 0:
            directions.append(Direction(
                estimator.direction(),
                previous.alpha if previous else self.settings.default_alpha,
                previous.mode if previous else "projection",
                previous.threshold if previous else self.settings.default_threshold,
                LEARNED,
            ))
        return DirectionSet(centroid.value().numpy(), directions, EstimatorState.of(estimator, centroid))

    def _validate(self, ds: DirectionSet) -> None:
        try:
            validate_direction_set(ds, self.settings.latent_dim, self.limits.max_direction_norm,
                                   self.limits.max_alpha, self.limits.max_directions)
        except ValueError as exc:
            raise ControlError(str(exc)) from None

    def _check_images(self, images: np.ndarray | None) -> np.ndarray:
        c, h, w = self.settings.input_shape
        if images is None:
            raise ControlError(f"observe needs IMAGES: uint8 N x {h} x {w} x {c}")
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (h, w, c):
            raise ControlError(f"IMAGES must be uint8 N x {h} x {w} x {c}, got {images.dtype} {list(images.shape)}")
        if not 1 <= len(images) <= self.limits.max_observe_images:
            raise ControlError(f"observe takes 1 to {self.limits.max_observe_images} images, got {len(images)}")
        return images


class ControlStage:
    """Adapter between Triton requests and the Controller (one request at a time: max_batch_size 0)."""

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        artifacts = resolve_artifacts(args["model_repository"], params.get("artifacts_dir", "artifacts"))
        self.max_batch = 64
        self.controller = Controller(artifacts, server_token(), self._head_latents)

    def _head_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Latents from the served head itself (BLS), so learning sees exactly what repair sees."""
        parts = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch].contiguous().numpy()
            response = self.pb.InferenceRequest(
                model_name="fire_head", requested_output_names=["LATENT"], inputs=[self.pb.Tensor("IMAGE", chunk)]
            ).exec()
            if response.has_error():
                raise ControlError(f"head stage failed: {response.error().message()}")
            parts.append(torch.from_numpy(self.pb.get_output_tensor_by_name(response, "LATENT").as_numpy().copy()))
        return torch.cat(parts)

    def _one(self, request: Any) -> Any:
        limits = self.controller.limits
        raw = self.pb.get_input_tensor_by_name(request, "REQUEST").as_numpy().reshape(-1)[0]
        token_raw = self.pb.get_input_tensor_by_name(request, "TOKEN").as_numpy().reshape(-1)[0]
        if len(raw) > limits.max_request_bytes:
            raise ControlError(f"request of {len(raw)} bytes; at most {limits.max_request_bytes}")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ControlError("REQUEST is not valid JSON") from None
        if not isinstance(body, dict):
            raise ControlError("REQUEST must be a JSON object")
        images_tensor = self.pb.get_input_tensor_by_name(request, "IMAGES")
        images = images_tensor.as_numpy() if images_tensor is not None else None
        token = token_raw.decode() if isinstance(token_raw, bytes) else str(token_raw)
        result = self.controller.handle(body, token, images)
        payload = np.array([json.dumps(result).encode()], dtype=np.object_)
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor("RESPONSE", payload)])

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
