"""The control endpoint's logic (model ``fire_control``): push, observe, status, history, rollback.

Triton-free: :class:`fire_backend.serving.control_stage.ControlStage` adapts it to Triton requests, and unit
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
from typing import Any, TypeVar

import numpy as np
import torch

from fire_backend.data.augment import trigger_breaking_augmentations
from fire_backend.data.datasets import to_tensor
from fire_backend.fire import AugmentedEstimator, Direction, RunningMean, UnpairedEstimator, UnpairedOptions, centroid
from fire_backend.multilayer import EstimationSettings, Evidence, learn, repairs_of, run
from fire_backend.network import Network
from fire_backend.serving.artifacts import ServingSettings, load_centroid, load_reserve, repository_store
from fire_backend.store import Conflict, DirectionSet, LayeredSet, StoreError, validate_direction_set
from fire_backend.store_damage import DamageListener
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


def estimation_settings(settings: ServingSettings) -> EstimationSettings:
    """How a repository's directions are estimated at several layers (its serving settings, typed)."""
    return EstimationSettings(settings.estimation, UnpairedOptions(settings.estimation_z or None,
                                                                   settings.nontarget_reference),
                              settings.default_alpha, settings.default_threshold, settings.max_batch_size)


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
    """Triton-independent control logic; ``latents`` computes head latents for observed images.

    A repository repairing at several layers also needs ``network`` (the whole network): ``observe`` then learns
    every configured layer at once from all flagged images kept in the live version and the clean reserve
    (:func:`fire_backend.multilayer.learn`, which ranks the layer subsets without labels), and ``push`` takes a
    ``layer``. A one-layer repository keeps the streaming estimator and the one-layer store format.
    """

    def __init__(self, artifacts: Path, token: str | None, latents: Callable[[torch.Tensor], torch.Tensor],
                 network: Network | None = None, on_damage: DamageListener | None = None) -> None:
        self.artifacts = artifacts
        self.settings = ServingSettings.read(artifacts)
        self.layered = len(self.settings.repair_layers) > 1
        if self.layered and network is None:
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

    # -- read-only ---------------------------------------------------------------------------
    def _live(self, intact: bool) -> tuple[int, DirectionSet]:
        """The newest verified committed version and its set; ``intact``: refuse when the committed one is damaged.

        Version 0 (or no verifiable version) is the clean centroid with no direction.
        """
        number, layered = self._live_layered(intact)
        return number, self._split_set(layered)

    def _live_layered(self, intact: bool) -> tuple[int, LayeredSet | None]:
        """:meth:`_live` over every layer: the verified version's number and sets, read once."""
        state = self.store.resolve()
        if state.version is None:
            raise ControlError(f"the store is damaged ({'; '.join(state.damage)}); nothing was changed")
        if intact and state.verified != state.version:
            raise ControlError(f"the live version {state.version} is damaged ({'; '.join(state.damage)}); roll back "
                               "to a verified version or push a direction set first")
        return state.verified or 0, self._layered(state.verified)

    def _layered(self, verified: int | None) -> LayeredSet | None:
        """Every layer's set of the verified version (None for version 0 or none verifying)."""
        return self.store.read_version(verified).layered if verified else None

    def _split_set(self, layered: LayeredSet | None) -> DirectionSet:
        """The set at the split layer; without one, the clean centroid and no direction."""
        sets = layered.at(self.settings.layer) if layered else {}
        if self.settings.layer in sets:
            return sets[self.settings.layer]
        center, _ = load_centroid(self.artifacts)
        return DirectionSet(center, [], None)

    def status(self) -> dict[str, Any]:
        state = self.store.resolve()  # once: status reads the store as one snapshot, the verified version once
        layered = self._layered(state.verified)
        ds = self._split_set(layered)
        est = ds.estimator
        return {
            "version": state.version,
            "verified_version": state.verified,
            "damage": list(state.damage),
            "degraded": state.degraded,
            "layer": self.settings.layer,
            "latent_shape": list(self.settings.latent_shape),
            "directions": [
                {"name": d.name, "alpha": d.alpha, "mode": d.mode, "threshold": d.threshold,
                 "norm": float(d.beta.norm())} for d in ds.directions
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
        if self.layered:
            return self._push_layer(request, directions, force, actor, note)
        if request.get("layer") not in (None, self.settings.layer):
            raise ControlError(f"push: this repository repairs at {self.settings.layer} only, not "
                               f"{str(request['layer'])[:40]!r}")
        measured: list[float | None] = []

        def block() -> int:
            _, live = self._live(intact=False)
            ds = DirectionSet(self._center(request, live.center), directions, live.estimator)
            self._validate(ds)
            measured[:] = [self._guard(LayeredSet({self.settings.layer: ds}), force)]
            return self.store.commit(ds, "push", actor, {"directions": len(directions), **self._figure(measured[0],
                                                                                                      force), **note})

        return {"version": self._atomically(block), "action": "push", "clean_change": measured[0]}

    def observe(self, request: dict[str, Any], images: np.ndarray | None, actor: str,
                note: dict[str, Any]) -> dict[str, Any]:
        clean = _given(request, "clean", False)
        images = self._check_images(images)
        if self.layered:
            return self._observe_layers(request, images, actor, note)
        kind = _given(request, "estimator", self.settings.estimator)
        if kind not in ESTIMATORS:
            raise ControlError(f"observe: 'estimator' must be one of {', '.join(ESTIMATORS)}, not {kind[:40]!r}")
        every = _given(request, "publish_every", self.settings.publish_every)
        if every < 1:
            raise ControlError("observe: 'publish_every' must be >= 1")
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        latents = self.latents(batch).reshape(len(batch), -1)
        twins = None
        if kind == "augmented" and not clean:
            augs = trigger_breaking_augmentations(batch.shape[-1])
            twins = torch.stack([self.latents(a(batch)).reshape(len(batch), -1) for a in augs])
        versions: list[int] = []

        def block() -> tuple:
            # A block run again after a lost race folds only the chunks not yet committed, onto the new live version
            # (whose history already holds this request's nonce once a chunk is in).
            _, live = self._live(intact=True)
            estimator, centroid = self._estimator(live, kind)
            for start in range(every * len(versions), len(batch), every):
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
                                                  {"samples": stop - start, "estimator": kind, **note}))
            return estimator, centroid

        estimator, centroid = self._atomically(block)
        return {"version": versions[-1], "versions": versions, "action": "observe",
                "poisoned_count": estimator.count, "clean_count": centroid.count}

    # -- several layers ------------------------------------------------------------------------
    def _clean_evidence(self) -> torch.Tensor:
        return to_tensor(load_reserve(self.artifacts))

    def _live_layers(self) -> LayeredSet:
        """The live version over every configured layer (a layer it lacks: the clean reserve's centroid there, no
        direction). Refuses when the committed version is damaged."""
        _, live = self._live_layered(intact=True)
        sets = live.at(self.settings.layer) if live else {}
        missing = [layer for layer in self.settings.repair_layers if layer not in sets]
        if missing:
            _, latents = run(self.network, self._clean_evidence(), {}, missing, self.settings.max_batch_size)
            sets.update({layer: DirectionSet(centroid(latents[layer]).numpy()) for layer in missing})
        return LayeredSet({layer: sets[layer] for layer in self.settings.repair_layers},
                          live.flagged if live else None, live.ranking if live else [])

    def _push_layer(self, request: dict[str, Any], directions: list[Direction], force: bool, actor: str,
                    note: dict[str, Any]) -> dict[str, Any]:
        layer = _given(request, "layer", self.settings.layer)
        if layer not in self.settings.repair_layers:
            raise ControlError(f"push: 'layer' must be one of {', '.join(self.settings.repair_layers)}, "
                               f"not {layer[:40]!r}")
        measured: list[float | None] = []

        def block() -> int:
            live = self._live_layers()
            live.sets[layer] = DirectionSet(self._center(request, live.sets[layer].center), directions)
            self._validate(live.sets[layer], layer)
            measured[:] = [self._guard(live, force)]
            return self.store.commit(live, "push", actor, {"directions": len(directions), "layer": layer,
                                                           **self._figure(measured[0], force), **note})

        return {"version": self._atomically(block), "action": "push", "layer": layer, "clean_change": measured[0]}

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
            reserve = self._clean_evidence()
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

    def _observe_layers(self, request: dict[str, Any], images: np.ndarray, actor: str,
                        note: dict[str, Any]) -> dict[str, Any]:
        """Learn every configured layer from all flagged images kept so far plus these, ranking the layer subsets
        without labels; one committed version per ``publish_every`` images, by default one for the whole request
        (each version re-learns and re-ranks from everything kept: republishing after every image would multiply
        the cost, tens of seconds per version for a full-size network on a CPU)."""
        if _given(request, "clean", False):
            raise ControlError("observe: a repository repairing at several layers takes its clean evidence from the "
                               "reserve it was built with; observe flagged images only")
        if _given(request, "estimator", "unpaired") != "unpaired":
            raise ControlError("observe: several layers are learned with the unpaired estimator only")
        every = _given(request, "publish_every", len(images))
        if every < 1:
            raise ControlError("observe: 'publish_every' must be >= 1")
        settings = estimation_settings(self.settings)
        clean = self._clean_evidence()
        versions: list[int] = []

        def block() -> tuple:
            # As the one-layer observe: a block run again after a lost race learns the images not yet committed on
            # top of the new live version, whose kept flagged images hold those already committed by this request.
            done = every * len(versions)
            live = self._live_layers()
            kept = live.flagged if live.flagged is not None else images[:0]
            if len(kept) + len(images) - done > self.limits.max_observe_images:
                raise ControlError(f"observe: the live version already holds {len(kept)} flagged images; at most "
                                   f"{self.limits.max_observe_images} in all (roll back to version 0 to start over)")
            for start in range(done, len(images), every):
                flagged = np.concatenate([kept, images[done:start + every]])
                evidence = Evidence(self.network, clean, to_tensor(flagged), self.settings.repair_layers,
                                    self.settings.max_batch_size)
                sets, ranking = learn(evidence, settings)
                layered = LayeredSet({layer: self._learned_layer(live.sets[layer], learned, center)
                                      for layer, (learned, center) in sets.items()}, flagged,
                                     [score.to_dict() for score in ranking])
                for layer, ds in layered.sets.items():
                    self._validate(ds, layer)
                chosen = [layer for layer, (learned, _) in sets.items() if learned]
                versions.append(self.store.commit(layered, "observe", actor, {
                    "samples": min(every, len(images) - start), "flagged": len(flagged), "layers": chosen,
                    "estimation": settings.mode, "target": evidence.target, **note}))
            return flagged, chosen, evidence, layered

        flagged, chosen, evidence, layered = self._atomically(block)
        return {"version": versions[-1], "versions": versions, "action": "observe", "poisoned_count": len(flagged),
                "layers": chosen, "target": evidence.target, "ranking": layered.ranking}

    def _learned_layer(self, live: DirectionSet, learned: list[Direction], center: torch.Tensor) -> DirectionSet:
        """A layer's new set: its pushed directions kept, the learned one replaced (none where the ranking left the
        layer out), measured from the centroid it was learned with."""
        kept = [d for d in live.directions if d.name != LEARNED]
        return DirectionSet(center.numpy(), kept + [replace(d, name=LEARNED) for d in learned])

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

    def _validate(self, ds: DirectionSet, layer: str | None = None) -> None:
        try:
            validate_direction_set(ds, self.settings.layer_dims[layer or self.settings.layer],
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
