"""The control endpoint's logic (model ``fire_control``): push, observe, status, history, rollback.

Triton-free: :class:`fire_backend.stub.control_stage.ControlStage` adapts it to Triton requests, and unit
tests drive it directly. Reached through the same Triton endpoints as inference.

Every action needs a credential made with the control token for exactly this request
(:mod:`fire_backend.wire.auth`: an HMAC over the request and its images, checked in constant time, within a
time window, each nonce accepted once), so the token itself never crosses the wire or the stub's shared memory.
The request is a JSON object checked field by field before anything runs: booleans are JSON booleans, integers
JSON integers, unknown fields are refused. A refused action changes nothing and says why in one line.

The store is the only state: each action reads the live version, changes it, and commits in one atomic block
(the file store's lock, or etcd's compare-and-set: a block that lost the race runs again on the new version), so
several control instances or servers on one store stay consistent, two operators never both create version N,
and a crash loses nothing committed.
Every accepted request's nonce is recorded in the store (:meth:`StoreBackend.claim_nonce`), so a captured request,
read-only or not, cannot be replayed against another server on the same store, nor after a restart. Where the
store cannot record it (missing, full, unreachable), a read-only request is still served, guarded in memory only;
a writer fails anyway.

A push is measured before it is committed: the share of the defender's clean reserve images
(``artifacts/reserve.npz``) whose prediction the new set's repair changes. Above ``limits.max_clean_change`` it is
refused unless forced; the history records the figure either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from fire_backend.data.augment import trigger_breaking_augmentations
from fire_backend.data.datasets import to_tensor
from fire_backend.fire import AugmentedEstimator, Direction, RunningMean, UnpairedEstimator, centroid
from fire_backend.models.network import Network
from fire_backend.multilayer import EstimationSettings, Evidence, learn, repairs_of, run
from fire_backend.repository.layout import ServingSettings, load_centroid, load_reserve, repository_store
from fire_backend.stores.damage import DamageListener
from fire_backend.stores.format import Conflict, DirectionSet, LayeredSet, StoreError, validate_direction_set
from fire_backend.wire.auth import CONTROL, WINDOW_S, AuthError, Credential, ReplayGuard, digest, verify
from fire_backend.wire.names import IMAGES, MAX_CONTROL_REQUEST_BYTES, REQUEST
from fire_backend.wire.token import TOKEN_ENV, TOKEN_FILE_ENV

LOG = logging.getLogger("fire_backend.control")
LEARNED = "learned"
ESTIMATORS = ("unpaired", "augmented")
#: how long a writer's block keeps running again after losing compare-and-set races before it gives up
CONFLICT_DEADLINE_S = 20.0
#: the longest random pause before a lost block runs again (the pause doubles from 5 ms up to this)
CONFLICT_BACKOFF_S = 0.2
#: how long a request's nonce stays recorded: past it, the credential's time window refuses it anyway
NONCE_TTL_S = 2 * WINDOW_S
T = TypeVar("T")


class ControlError(ValueError):
    """The action is refused; nothing was changed."""


class AuthRefused(ControlError):
    """The action is refused for its credential (missing, wrong, expired, replayed); nothing was changed."""


def token_id(token: str) -> str:
    """A short, non-reversible name for a token in the audit log."""
    return "tok-" + hashlib.sha256(token.encode()).hexdigest()[:10]


# -- the request schema -------------------------------------------------------------------------------
# A field's kind names what JSON value it takes; _check() holds the one test per kind.
BOOL, INT, NUMBER, TEXT, NUMBERS, DIRECTIONS = "boolean", "integer", "number", "string", "numbers", "directions"
KIND_WORDS = {BOOL: "a JSON boolean (true or false)", INT: "a JSON integer", NUMBER: "a JSON number",
              TEXT: "a JSON string", NUMBERS: "a list of JSON numbers", DIRECTIONS: "a non-empty list of objects"}
#: action -> {field: (kind, required)}; "action" itself is implied
ACTION_FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "status": {},
    "history": {},
    "rollback": {"version": (INT, True)},
    "push": {"directions": (DIRECTIONS, True), "center": (NUMBERS, False), "layer": (TEXT, False),
             "force": (BOOL, False)},
    "observe": {"clean": (BOOL, False), "estimator": (TEXT, False), "publish_every": (INT, False)},
}
ACTIONS = tuple(ACTION_FIELDS)
WRITERS = ("push", "observe", "rollback")
DIRECTION_FIELDS: dict[str, tuple[str, bool]] = {
    "beta": (NUMBERS, True), "alpha": (NUMBER, False), "mode": (TEXT, False), "threshold": (NUMBER, False),
    "name": (TEXT, False),
}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:17] + "..."
        return f"the string {json.dumps(shown)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return "a list" if isinstance(value, list) else "an object"


def _check(kind: str, value: Any) -> bool:
    if kind == BOOL:
        return type(value) is bool
    if kind == INT:
        return type(value) is int
    if kind == NUMBER:
        return type(value) in (int, float)
    if kind == TEXT:
        return type(value) is str
    if kind == NUMBERS:
        return type(value) is list and all(type(v) in (int, float) for v in value)
    return type(value) is list and bool(value) and all(type(v) is dict for v in value)


def check_fields(where: str, body: dict[str, Any], fields: dict[str, tuple[str, bool]]) -> None:
    """Refuse unknown fields, missing required ones and values of the wrong JSON type (null means "not given")."""
    unknown = sorted(set(body) - set(fields))
    if unknown:
        allowed = ", ".join(fields) or "none"
        raise ControlError(f"{where}: unknown field {unknown[0]!r} (allowed: {allowed})")
    for name, (kind, required) in fields.items():
        value = body.get(name)
        if value is None:
            if required:
                raise ControlError(f"{where}: '{name}' is required: {KIND_WORDS[kind]}")
            continue
        if not _check(kind, value):
            raise ControlError(f"{where}: '{name}' must be {KIND_WORDS[kind]}, not {_describe(value)}")


def _given(body: dict[str, Any], name: str, default: Any) -> Any:
    """A checked field's value, ``default`` when absent or null."""
    value = body.get(name)
    return default if value is None else value


def parse_request(raw: bytes) -> dict[str, Any]:
    """The JSON object of a REQUEST, its fields checked against its action's schema."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ControlError(f"{REQUEST} is not UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise ControlError(f"{REQUEST} must be a JSON object")
    action = body.get("action")
    if not isinstance(action, str) or action not in ACTION_FIELDS:
        shown = _describe(action) if not isinstance(action, str) else repr(action[:40])
        raise ControlError(f"unknown action {shown}; one of {', '.join(ACTIONS)}")
    check_fields(action, {k: v for k, v in body.items() if k != "action"}, ACTION_FIELDS[action])
    for i, entry in enumerate(body.get("directions") or []):
        check_fields(f"push: direction {i}", entry, DIRECTION_FIELDS)
    return body


def action_of(raw: bytes) -> str | None:
    """The action a REQUEST names, when it is one of ACTIONS (None otherwise); for counting, before any check."""
    try:
        action = json.loads(raw).get("action")
    except (ValueError, AttributeError):  # not JSON (UnicodeDecodeError is a ValueError), or not an object
        return None
    return action if isinstance(action, str) and action in ACTION_FIELDS else None


class Controller:
    """Triton-independent control logic; ``latents`` computes split-layer latents for observed images.

    Every writer takes one path for any repository: read the live version over every configured layer
    (:meth:`_live_layers`), derive the next, check it, commit it whole as one layered version. Only how ``observe``
    learns depends on the repository (:meth:`_learner`); ``push`` names its ``layer``. A repository repairing at
    several layers also needs ``network`` (the whole network): to learn every layer at once, and for the layers'
    clean centroids.
    """

    def __init__(self, artifacts: Path, token: str | None, latents: Callable[[torch.Tensor], torch.Tensor],
                 network: Network | None = None, on_damage: DamageListener | None = None) -> None:
        self.artifacts = artifacts
        self.settings = ServingSettings.read(artifacts)
        if len(self.settings.repair_layers) > 1 and network is None:
            raise ValueError("a repository with several repair layers needs the whole network to learn online")
        self.network = network
        # Nothing is created here: a store that is missing or unreachable while the server starts is damage for status
        # to name, not a reason to refuse loading (the repair stages hold requests meanwhile). A commit a killed writer
        # left half-published (its history line, not CURRENT) is finished, as at every repair instance's start.
        self.store = repository_store(artifacts, self.settings, on_damage)
        self.store.recover()
        self.token = token
        self.latents = latents
        self.limits = self.settings.limits
        #: REQUEST and IMAGES bytes of one request: the repository's limit, never above the wire's bound
        self.max_request_bytes = min(self.limits.max_request_bytes, MAX_CONTROL_REQUEST_BYTES)
        self.replay = ReplayGuard()
        self._clean_predictions: torch.Tensor | None = None

    # -- entry point -----------------------------------------------------------------------
    def handle(self, request: bytes, credential: bytes | str, images: np.ndarray | None,
               now: float | None = None) -> dict[str, Any]:
        """Authenticate, validate and run one action; raises ControlError with a one-line message.

        ``request`` is the REQUEST's raw bytes (the credential signs exactly them), ``credential`` the TOKEN input.
        """
        size = len(request) + (images.nbytes if images is not None else 0)
        if size > self.max_request_bytes:
            raise ControlError(f"a control request of {size} bytes ({REQUEST} and {IMAGES}); at most "
                               f"{self.max_request_bytes}: split it (`fire ctl observe` and ControlClient.observe "
                               "send a large observe in requests within the bound)")
        signed = self._authenticate(request, credential, images, now)
        body = parse_request(request)
        try:
            self._claim(body["action"], signed.nonce)
            return self._run(body, signed, images)
        except StoreError as exc:  # e.g. the engine unreachable: the message says what is known of the outcome
            raise ControlError(str(exc)) from None

    def _claim(self, action: str, nonce: str) -> None:
        """Record the request's nonce in the store, refusing a replay (another server on this store, a restart).
        A read-only action the store cannot record goes on with the in-memory guard alone; a writer fails."""
        try:
            fresh = self.store.claim_nonce(nonce, NONCE_TTL_S)
        except StoreError as exc:
            if action in WRITERS:
                raise
            LOG.warning("%s served with its nonce guarded in memory only: %s", action, exc)
            return
        if not fresh:
            raise AuthRefused("permission denied: this credential was already used (replayed request)")

    def _run(self, body: dict[str, Any], signed: Credential, images: np.ndarray | None) -> dict[str, Any]:
        action = body["action"]
        if action == "status":
            return self.status()
        if action == "history":
            return {"history": self.store.history()}
        actor = token_id(self.token or "")
        note = {"nonce": signed.nonce}
        if action == "rollback":
            return self.rollback(body, actor, note)
        if action == "push":
            return self.push(body, actor, note)
        return self.observe(body, images, actor, note)

    def _authenticate(self, request: bytes, credential: bytes | str, images: np.ndarray | None,
                      now: float | None) -> Credential:
        if self.token is None:
            raise AuthRefused("permission denied: the server has no control token configured "
                               f"(set {TOKEN_ENV} or {TOKEN_FILE_ENV} for `fire serve`)")
        if isinstance(credential, bytes):
            try:
                credential = credential.decode("ascii")
            except UnicodeDecodeError:
                credential = ""  # not a credential: verify() refuses it as malformed
        pixels = np.ascontiguousarray(images).tobytes() if images is not None else b""
        try:
            signed = verify(self.token, CONTROL, digest(request, pixels), credential, now=now)
            self.replay.remember(signed, now=now)
        except AuthError as exc:
            raise AuthRefused(str(exc)) from None
        return signed

    def _atomically(self, block: Callable[[], T]) -> T:
        """Run a read-derive-commit ``block`` as one: under the file store's lock, or optimistically on etcd, where a
        block that lost the race to another writer (Conflict) runs again on the version that writer made live.

        A lost block waits a random, doubling pause first: run again at once, two writers with several commits each
        can keep colliding (a fixed 8 tries failed that way on a slow CI machine), while the pause lets the winner
        finish. It gives up after CONFLICT_DEADLINE_S.
        """
        give_up, attempt = time.monotonic() + CONFLICT_DEADLINE_S, 0
        while True:
            try:
                with self.store.locked():
                    return block()
            except Conflict:
                attempt += 1
                if time.monotonic() >= give_up:
                    raise ControlError(f"the store changed under this request {attempt} times in "
                                       f"{CONFLICT_DEADLINE_S:g} s (busy concurrent writers); nothing more was "
                                       "committed, try again") from None
                time.sleep(random.uniform(0.0, min(CONFLICT_BACKOFF_S, 0.005 * 2 ** attempt)))

    # -- the live version -----------------------------------------------------------------------
    def _layered(self, verified: int | None) -> LayeredSet | None:
        """Every layer's set of the verified version (None for version 0 or none verifying)."""
        return self.store.read_version(verified).layered if verified else None

    def _live_layers(self, intact: bool = True) -> LayeredSet:
        """The newest verified committed version over every configured layer, what every writer starts from: a layer
        it lacks (version 0, or a version without that layer) has its clean centroid and no direction. ``intact``:
        refuse when the committed version itself is damaged."""
        state = self.store.resolve()
        if state.version is None:
            raise ControlError(f"the store is damaged ({'; '.join(state.damage)}); nothing was changed")
        if intact and state.verified != state.version:
            raise ControlError(f"the live version {state.version} is damaged ({'; '.join(state.damage)}); roll back "
                               "to a verified version or push a direction set first")
        live = self._layered(state.verified)
        sets = live.at(self.settings.layer) if live else {}
        sets.update(self._clean_sets([layer for layer in self.settings.repair_layers if layer not in sets]))
        return LayeredSet({layer: sets[layer] for layer in self.settings.repair_layers},
                          live.flagged if live else None, live.ranking if live else [])

    def _clean_sets(self, layers: list[str]) -> dict[str, DirectionSet]:
        """Direction-free sets at ``layers``: the split layer's centroid the repository was built with, the clean
        reserve's centroid at any other layer."""
        sets = {}
        if self.settings.layer in layers:
            sets[self.settings.layer] = DirectionSet(load_centroid(self.artifacts)[0])
        others = [layer for layer in layers if layer != self.settings.layer]
        if others:
            _, latents = run(self.network, self.clean_evidence(), {}, others, self.settings.max_batch_size)
            sets.update({layer: DirectionSet(centroid(latents[layer]).numpy()) for layer in others})
        return sets

    def clean_evidence(self) -> torch.Tensor:
        """The defender's clean reserve images the repository was built with (float N x C x H x W)."""
        return to_tensor(load_reserve(self.artifacts))

    def status(self) -> dict[str, Any]:
        state = self.store.resolve()  # once: status reads the store as one snapshot, the verified version once
        layered = self._layered(state.verified)
        split = (layered.at(self.settings.layer) if layered else {}).get(self.settings.layer)
        est = split.estimator if split else None
        return {
            "version": state.version,
            "verified_version": state.verified,
            "damage": list(state.damage),
            "degraded": state.degraded,
            "layer": self.settings.layer,
            "latent_shape": list(self.settings.latent_shape),
            "directions": [
                {"name": d.name, "alpha": d.alpha, "mode": d.mode, "threshold": d.threshold,
                 "norm": float(d.beta.norm())} for d in (split.directions if split else [])
            ],
            "estimator": None if est is None else {
                "kind": est.kind, "poisoned_count": est.poisoned_count, "clean_count": est.clean_count},
            "publish_every": self.settings.publish_every,
            **self._instances(state.version, state.sha256),
            **self._layer_status(layered),
        }

    def _layer_status(self, layered: LayeredSet | None) -> dict[str, Any]:
        """Per configured layer: how many directions the live version holds; the flagged images it was learned from
        and the label-free ranking that chose its layers (best first)."""
        counts = layered.counts(self.settings.layer) if layered else {}
        return {
            "repair_layers": list(self.settings.repair_layers),
            "estimation": self.settings.estimation,
            "layers": {layer: counts.get(layer, 0) for layer in self.settings.repair_layers},
            "flagged_kept": 0 if layered is None or layered.flagged is None else len(layered.flagged),
            "ranking": layered.ranking if layered else [],
        }

    def _instances(self, live: int | None, sha256: str) -> dict[str, list[dict[str, Any]]]:
        """``instances``: the running repair instances, each with the version it applies, ``lag_s`` (seconds from
        that version's commit until it applied it; None for the version it started with) and ``behind_s`` (None
        when it applies the live version, else seconds since the live version was committed); ``gone``: entries
        of instances that no longer run (killed outright; `fire serve` prunes them)."""
        entries = self.store.instance_entries()
        since = self.store.committed_at(live, sha256) if live is not None else None
        now = time.time()
        running = []
        for entry in entries:
            if entry["alive"] is not False:
                behind = None if entry["version"] == live or since is None else now - since
                running.append({**entry, "lag_s": entry.get("lag_s"), "behind_s": behind})
        return {"instances": running, "gone": [e for e in entries if e["alive"] is False]}

    # -- writers -----------------------------------------------------------------------------
    def rollback(self, request: dict[str, Any], actor: str, note: dict[str, Any]) -> dict[str, Any]:
        version = request["version"]
        if version < 0:
            raise ControlError("rollback: 'version' must be >= 0")

        def block() -> None:
            self.store.rollback(version, actor, note)

        self._atomically(block)
        return {"version": version, "action": "rollback"}

    def push(self, request: dict[str, Any], actor: str, note: dict[str, Any]) -> dict[str, Any]:
        """Replace the directions of one repaired layer (``layer``, by default the split layer); every other layer's
        set, the estimator state and the kept flagged images carry over."""
        directions = []
        for i, entry in enumerate(request["directions"]):
            try:
                beta = torch.tensor(np.asarray(entry["beta"], dtype=np.float32)).reshape(-1)
                directions.append(Direction(
                    beta, float(_given(entry, "alpha", self.settings.default_alpha)),
                    _given(entry, "mode", "projection"),
                    float(_given(entry, "threshold", self.settings.default_threshold)), _given(entry, "name", f"d{i}")))
            except (OverflowError, ValueError) as exc:
                raise ControlError(f"push: direction {i}: {exc}") from None
        force = _given(request, "force", False)
        layer = _given(request, "layer", self.settings.layer)
        if layer not in self.settings.repair_layers:
            raise ControlError(f"push: 'layer' must be one of {', '.join(self.settings.repair_layers)}, "
                               f"not {layer[:40]!r}")
        measured: list[float | None] = []

        def block() -> int:
            # A push is how an operator replaces a damaged live version: it builds on the newest one that verifies.
            live = self._live_layers(intact=False)
            previous = live.sets[layer]
            live.sets[layer] = DirectionSet(self._center(request, previous.center), directions, previous.estimator)
            self._validate(live.sets[layer], layer)
            measured[:] = [self._guard(live, force)]
            return self.store.commit(live, "push", actor, {"directions": len(directions), "layer": layer,
                                                           **self._figure(measured[0], force), **note})

        return {"version": self._atomically(block), "action": "push", "layer": layer, "clean_change": measured[0]}

    def observe(self, request: dict[str, Any], images: np.ndarray | None, actor: str,
                note: dict[str, Any]) -> dict[str, Any]:
        """Learn from flagged (or, with ``clean``, clean) images; one committed version per ``publish_every`` images.

        The repository's learner (:meth:`_learner`) says how each chunk is folded in; reading the live version,
        checking and committing are the same for every repository.
        """
        images = self._check_images(images)
        learner = self._learner(request, images)
        every = _given(request, "publish_every", learner.every)
        if every < 1:
            raise ControlError("observe: 'publish_every' must be >= 1")
        versions: list[int] = []

        def block() -> dict[str, Any]:
            # A block run again after a lost race learns only the images not yet committed, on top of the new live
            # version (whose history already holds this request's nonce once a chunk is in).
            live = self._live_layers(intact=True)
            done = every * len(versions)
            learner.resume(live, len(images) - done)
            for start in range(done, len(images), every):
                stop = min(start + every, len(images))
                live, recorded = learner.learn(live, start, stop)
                for layer, ds in live.sets.items():
                    self._validate(ds, layer)
                versions.append(self.store.commit(live, learner.action, actor,
                                                  {"samples": stop - start, **recorded, **note}))
            return learner.answer(live)

        answer = self._atomically(block)
        return {"version": versions[-1], "versions": versions, "action": "observe", **answer}

    def _learner(self, request: dict[str, Any], images: np.ndarray) -> Learner:
        """How this repository learns: the streaming estimator at its one repaired layer, the label-free ranking
        over several."""
        if len(self.settings.repair_layers) > 1:
            return RankingLearner(self, request, images)
        return StreamingLearner(self, request, images)

    # -- the clean-image guard -------------------------------------------------------------------
    def _guard(self, candidate: LayeredSet, force: bool) -> float | None:
        """The share of the clean reserve's predictions ``candidate`` changes; ControlError above the limit unless
        forced. None where it cannot be measured (no network or reserve in this process)."""
        share = self.clean_change(candidate)
        limit = self.limits.max_clean_change
        if share is not None and share > limit and not force:
            raise ControlError(f"push: the new set changes {share:.1%} of the defender's clean reserve predictions "
                               f"(at most {limit:.0%} without --force): it would cost clean accuracy; check the "
                               "directions and their alpha, or push again with --force; nothing was changed")
        return share

    @staticmethod
    def _figure(share: float | None, force: bool) -> dict[str, Any]:
        """What the history records of the guard: the measured share, and whether the push was forced."""
        return {"clean_change": None if share is None else round(share, 4), "forced": force}

    def clean_change(self, candidate: LayeredSet) -> float | None:
        """The share of the defender's clean reserve images whose prediction ``candidate``'s repair changes, against
        the unrepaired network (as ``observe``'s ranking counts a changed clean prediction); None without the
        network or the reserve."""
        if self.network is None:
            return None
        try:
            reserve = self.clean_evidence()
        except FileNotFoundError:
            return None
        batch = self.settings.max_batch_size
        if self._clean_predictions is None:
            self._clean_predictions = run(self.network, reserve, {}, batch=batch)[0].argmax(1)
        device = next(self.network.parameters()).device
        sets = {layer: (ds.directions, torch.from_numpy(ds.center))
                for layer, ds in candidate.at(self.settings.layer).items()}
        repaired = run(self.network, reserve, repairs_of(sets, device), batch=batch)[0].argmax(1)
        return float((repaired != self._clean_predictions).float().mean())

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _center(request: dict[str, Any], live: np.ndarray) -> np.ndarray:
        """A push's ``center`` when given, else the live one."""
        if request.get("center") is None:
            return live
        try:
            return np.asarray(request["center"], dtype=np.float32).reshape(-1)
        except (OverflowError, ValueError) as exc:
            raise ControlError(f"push: center: {exc}") from None

    def _validate(self, ds: DirectionSet, layer: str) -> None:
        try:
            validate_direction_set(ds, self.settings.layer_dims[layer],
                                   self.limits.max_direction_norm, self.limits.max_alpha, self.limits.max_directions)
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


class Learner(Protocol):
    """How ``observe`` folds images into the live version (:meth:`Controller.observe` runs it)."""

    #: the history's action, and how many images one version takes unless the request says
    action: str
    every: int

    def resume(self, live: LayeredSet, remaining: int) -> None:
        """Start (again, after a lost race) from ``live``, with ``remaining`` images still to learn."""

    def learn(self, live: LayeredSet, start: int, stop: int) -> tuple[LayeredSet, dict[str, Any]]:
        """The next version, after images ``start:stop``, and what its history line records."""

    def answer(self, live: LayeredSet) -> dict[str, Any]:
        """What the request's answer says beyond the versions."""


class StreamingLearner:
    """One repaired layer: each chunk refines the streaming estimator (unpaired, or augmentation-guided) whose state
    the version saves; ``clean`` images refine the clean centroid instead."""

    def __init__(self, controller: Controller, request: dict[str, Any], images: np.ndarray) -> None:
        settings = controller.settings
        self.controller, self.layer = controller, settings.layer
        self.clean = _given(request, "clean", False)
        self.kind = _given(request, "estimator", settings.estimator)
        if self.kind not in ESTIMATORS:
            raise ControlError(f"observe: 'estimator' must be one of {', '.join(ESTIMATORS)}, not {self.kind[:40]!r}")
        self.action = "observe-clean" if self.clean else "observe"
        self.every = settings.publish_every
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        self.latents = controller.latents(batch).reshape(len(batch), -1)
        self.twins = None
        if self.kind == "augmented" and not self.clean:
            augs = trigger_breaking_augmentations(batch.shape[-1])
            self.twins = torch.stack([controller.latents(a(batch)).reshape(len(batch), -1) for a in augs])

    def resume(self, live: LayeredSet, remaining: int) -> None:
        self.estimator, self.centroid = self._restore(live.sets[self.layer])

    def learn(self, live: LayeredSet, start: int, stop: int) -> tuple[LayeredSet, dict[str, Any]]:
        if self.clean:
            self.centroid.update(self.latents[start:stop])
        elif self.kind == "unpaired":
            self.estimator.observe(poisoned=self.latents[start:stop])
        else:
            self.estimator.observe_augmented(self.latents[start:stop], list(self.twins[:, start:stop]))
        learned = self._learned_set(live.sets[self.layer])
        return LayeredSet({**live.sets, self.layer: learned}, live.flagged, live.ranking), {"estimator": self.kind}

    def answer(self, live: LayeredSet) -> dict[str, Any]:
        return {"poisoned_count": self.estimator.count, "clean_count": self.centroid.count}

    def _restore(self, live: DirectionSet) -> tuple[UnpairedEstimator | AugmentedEstimator, RunningMean]:
        """The estimator the live set saved, or a fresh one from its clean centroid."""
        if live.estimator is not None and live.estimator.poisoned_count > 0:
            if live.estimator.kind != self.kind:
                raise ControlError(f"the live estimate is {live.estimator.kind!r}; observe with that estimator "
                                   "or roll back to version 0 to start over")
            return live.estimator.restore()
        center = torch.from_numpy(live.center)
        count = live.estimator.clean_count if live.estimator else load_centroid(self.controller.artifacts)[1]
        if self.kind == "unpaired":
            estimator = UnpairedEstimator(center.numel(), center, count)
            return estimator, estimator.clean
        return AugmentedEstimator(center.numel()), RunningMean(center.numel(), center, count)

    def _learned_set(self, live: DirectionSet) -> DirectionSet:
        """The live set with the learned direction replaced by the estimator's current one."""
        kept = [d for d in live.directions if d.name != LEARNED]
        previous = next((d for d in live.directions if d.name == LEARNED), None)
        directions = list(kept)
        if self.estimator.count > 0:
            directions.append(Direction(
                self.estimator.direction(),
                previous.alpha if previous else self.controller.settings.default_alpha,
                previous.mode if previous else "projection",
                previous.threshold if previous else self.controller.settings.default_threshold,
                LEARNED,
            ))
        unpaired = isinstance(self.estimator, UnpairedEstimator)
        state = self.estimator.state() if unpaired else self.estimator.state(self.centroid)
        return DirectionSet(self.centroid.value().numpy(), directions, state)


class RankingLearner:
    """Several repaired layers: every chunk re-learns every layer from all flagged images the version keeps plus the
    new ones, and re-ranks the layer subsets without labels (:func:`fire_backend.multilayer.learn`). One version for
    the whole request unless it says otherwise: each re-learns from everything kept, tens of seconds per version for
    a full-size network on a CPU."""

    action = "observe"

    def __init__(self, controller: Controller, request: dict[str, Any], images: np.ndarray) -> None:
        if _given(request, "clean", False):
            raise ControlError("observe: a repository repairing at several layers takes its clean evidence from the "
                               "reserve it was built with; observe flagged images only")
        if _given(request, "estimator", "unpaired") != "unpaired":
            raise ControlError("observe: several layers are learned with the unpaired estimator only")
        self.controller, self.images, self.every = controller, images, len(images)
        self.settings = EstimationSettings.of(controller.settings)
        self.clean = controller.clean_evidence()
        self.recorded: dict[str, Any] = {}

    def resume(self, live: LayeredSet, remaining: int) -> None:
        kept = 0 if live.flagged is None else len(live.flagged)
        limit = self.controller.limits.max_observe_images
        if kept + remaining > limit:
            raise ControlError(f"observe: the live version already holds {kept} flagged images; at most {limit} in "
                               "all (roll back to version 0 to start over)")

    def learn(self, live: LayeredSet, start: int, stop: int) -> tuple[LayeredSet, dict[str, Any]]:
        flagged = self.images[start:stop] if live.flagged is None else np.concatenate([live.flagged,
                                                                                       self.images[start:stop]])
        serving = self.controller.settings
        evidence = Evidence(self.controller.network, self.clean, to_tensor(flagged), serving.repair_layers,
                            serving.max_batch_size)
        sets, ranking = learn(evidence, self.settings)
        layered = LayeredSet({layer: self._learned_layer(live.sets[layer], learned, center)
                              for layer, (learned, center) in sets.items()}, flagged,
                             [score.to_dict() for score in ranking])
        chosen = [layer for layer, (learned, _) in sets.items() if learned]
        self.recorded = {"flagged": len(flagged), "layers": chosen, "estimation": self.settings.mode,
                         "target": evidence.target}
        return layered, self.recorded

    def answer(self, live: LayeredSet) -> dict[str, Any]:
        return {"poisoned_count": len(live.flagged), "layers": self.recorded["layers"],
                "target": self.recorded["target"], "ranking": live.ranking}

    @staticmethod
    def _learned_layer(live: DirectionSet, learned: list[Direction], center: torch.Tensor) -> DirectionSet:
        """A layer's new set: its pushed directions kept, the learned one replaced (none where the ranking left the
        layer out), measured from the centroid it was learned with."""
        kept = [d for d in live.directions if d.name != LEARNED]
        return DirectionSet(center.numpy(), kept + [replace(d, name=LEARNED) for d in learned])
