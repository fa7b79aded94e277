"""The control endpoint's logic (model ``fire_control``): push, observe, status, history, rollback.

Triton-free: :class:`fire_backend.serving.control_stage.ControlStage` adapts it to Triton requests, and unit
tests drive it directly. Reached through the same Triton endpoints as inference. Every action needs the
control token (compared in constant time, never logged); a rejected action changes nothing. The store is the only
state: each action reads the live version under the store lock, changes it, and commits, so several
control instances or servers on one shared store stay consistent and a crash loses nothing committed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fire_backend.data.augment import trigger_breaking_augmentations
from fire_backend.fire import AugmentedEstimator, Direction, RunningMean, UnpairedEstimator
from fire_backend.serving.artifacts import STORE_DIR, ServingSettings, load_centroid
from fire_backend.store import DirectionSet, DirectionStore, StoreError, validate_direction_set
from fire_backend.wire.names import IMAGES
from fire_backend.wire.token import TOKEN_ENV, TOKEN_FILE_ENV

LEARNED = "learned"
ACTIONS = ("status", "push", "observe", "rollback", "history")


class ControlError(ValueError):
    """The action is refused; nothing was changed."""


def token_id(token: str) -> str:
    """A short, non-reversible name for a token in the audit log."""
    return "tok-" + hashlib.sha256(token.encode()).hexdigest()[:10]


class Controller:
    """Triton-independent control logic; ``latents`` computes head latents for observed images."""

    def __init__(self, artifacts: Path, token: str | None, latents: Callable[[torch.Tensor], torch.Tensor]) -> None:
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
        center, _ = load_centroid(self.artifacts)
        return 0, DirectionSet(center, [], None)

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
        return {"version": versions[-1], "versions": versions, "action": "observe",
                "poisoned_count": estimator.count, "clean_count": centroid.count}

    # -- helpers -------------------------------------------------------------------------------
    def _estimator(self, live: DirectionSet, kind: str):
        if live.estimator is not None and live.estimator.poisoned_count > 0:
            if live.estimator.kind != kind:
                raise ControlError(f"the live estimate is {live.estimator.kind!r}; observe with that estimator "
                                   "or roll back to version 0 to start over")
            return live.estimator.restore()
        center = torch.from_numpy(live.center)
        count = live.estimator.clean_count if live.estimator else load_centroid(self.artifacts)[1]
        if kind == "unpaired":
            estimator = UnpairedEstimator(center.numel(), center, count)
            return estimator, estimator.clean
        return AugmentedEstimator(center.numel()), RunningMean(center.numel(), center, count)

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
        state = estimator.state() if isinstance(estimator, UnpairedEstimator) else estimator.state(centroid)
        return DirectionSet(centroid.value().numpy(), directions, state)

    def _validate(self, ds: DirectionSet) -> None:
        try:
            validate_direction_set(ds, self.settings.latent_dim, self.limits.max_direction_norm,
                                   self.limits.max_alpha, self.limits.max_directions)
        except ValueError as exc:
            raise ControlError(str(exc)) from None

    def _check_images(self, images: np.ndarray | None) -> np.ndarray:
        c, h, w = self.settings.input_shape
        if images is None:
            raise ControlError(f"observe needs {IMAGES}: uint8 N x {h} x {w} x {c}")
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (h, w, c):
            raise ControlError(f"{IMAGES} must be uint8 N x {h} x {w} x {c}, got {images.dtype} {list(images.shape)}")
        if not 1 <= len(images) <= self.limits.max_observe_images:
            raise ControlError(f"observe takes 1 to {self.limits.max_observe_images} images, got {len(images)}")
        return images
