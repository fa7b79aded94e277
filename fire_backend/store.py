"""A versioned, checksummed, crash-safe store of FIRE direction sets, shared by processes.

Layout of a store directory (it may sit on a volume shared by several servers):

    versions/00000007.fire   one file per version: a JSON header line (with the SHA-256 of the
                             payload) followed by an .npz payload; written to a temp file, fsynced,
                             renamed, directory fsynced. The payload holds one direction set (the
                             split layer's: the first format, still read and written) or one per
                             configured layer (:class:`LayeredSet`), committed together
    history.jsonl            the audit log and the commit point: one JSON line per change, each with
                             its own checksum; the live version is the last valid line's ``live``
    CURRENT                  a small pointer to the live version, rewritten atomically after the
                             history line; repair stages poll it with one ``stat`` per batch
    instances/<id>.json      which version each repair instance is applying (for ``status``)
    .lock                    writers serialise on an ``flock`` of this file

A crash at any point leaves either the previous or the new version live, never a partial one: a
version only becomes live through a fully written, fsynced history line, and every payload is
verified against its checksum before it is served.

The store fails closed: damage found later (an unreadable ``CURRENT``, a version file that no longer
verifies, a corrupt history line) never turns the defence off. :meth:`DirectionStore.resolve` works out
what is committed and what can be verified and names the damage; an instance keeps the last version it
verified rather than falling back to version 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fire_backend.atomic import atomic_write
from fire_backend.fire import MODES, Direction, EstimatorState
from fire_backend.instances import INSTANCES_DIR, InstanceRegistry
from fire_backend.store_damage import CHECKSUM, TORN_LINE, UNREADABLE_POINTER, DamageListener

LOG = logging.getLogger("fire_backend.store")
#: the one-layer format (still read and written for one-layer sets) and the several-layer one (older fire-backend
#: refuses it as "not a direction-set file" rather than misreading it)
MAGIC = "fire-backend/direction-set/v1"
MAGIC_LAYERED = "fire-backend/direction-set/v2"
MAGICS = (MAGIC, MAGIC_LAYERED)


class StoreError(Exception):
    """A store operation could not be carried out; the store is unchanged."""


class Conflict(StoreError):
    """Another writer committed first inside a :meth:`locked` block of a store that locks optimistically (etcd);
    nothing of the block was committed from then on: run the block again on the new live version."""


class StoreUnavailable(StoreError):
    """The store's engine could not be reached in time; a write's outcome is unknown (the message says how to
    find it in the history)."""


@dataclass
class DirectionSet:
    """What a version holds at one layer: the clean centroid, the live directions, and the estimator state."""

    center: np.ndarray  # float32 (D,)
    directions: list[Direction] = field(default_factory=list)
    estimator: EstimatorState | None = None

    @property
    def dim(self) -> int:
        return int(self.center.size)

    def arrays(self, prefix: str = "") -> dict[str, Any]:
        """The set as named arrays (``prefix`` keeps several layers' sets apart in one payload)."""
        arrays: dict[str, Any] = {"center": np.asarray(self.center, dtype=np.float32)}
        arrays["betas"] = np.stack([d.beta.reshape(-1).cpu().numpy().astype(np.float32) for d in self.directions]) \
            if self.directions else np.zeros((0, self.dim), np.float32)
        arrays["alphas"] = np.array([d.alpha for d in self.directions], np.float64)
        arrays["thresholds"] = np.array([d.threshold for d in self.directions], np.float64)
        arrays["modes"] = np.array([d.mode for d in self.directions], dtype="U16")
        arrays["names"] = np.array([d.name for d in self.directions], dtype="U64")
        if self.estimator is not None:
            e = self.estimator
            arrays.update(est_kind=np.array(e.kind), est_poisoned_mean=e.poisoned_mean.astype(np.float64),
                          est_poisoned_count=np.array(e.poisoned_count), est_clean_mean=e.clean_mean.astype(np.float64),
                          est_clean_count=np.array(e.clean_count))
        return {prefix + key: value for key, value in arrays.items()}

    @classmethod
    def of_arrays(cls, data: Any, prefix: str = "") -> DirectionSet:
        def get(key: str) -> np.ndarray:
            return data[prefix + key]

        directions = [
            Direction(torch.from_numpy(get("betas")[i].copy()), float(get("alphas")[i]), str(get("modes")[i]),
                      float(get("thresholds")[i]), str(get("names")[i]))
            for i in range(len(get("betas")))
        ]
        estimator = None
        if prefix + "est_kind" in data.files:
            estimator = EstimatorState(str(get("est_kind")), get("est_poisoned_mean").copy(),
                                       int(get("est_poisoned_count")), get("est_clean_mean").copy(),
                                       int(get("est_clean_count")))
        return cls(get("center").copy(), directions, estimator)

    def to_bytes(self) -> bytes:
        return _npz(self.arrays())

    @classmethod
    def from_bytes(cls, payload: bytes) -> DirectionSet:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            return cls.of_arrays(data)


def _npz(arrays: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


#: the layer of a set written by the one-layer format: the repository's split layer (``settings.layer``)
SPLIT = ""


@dataclass
class LayeredSet:
    """What a version holds across layers, committed as one: a direction set per configured layer (a layer with
    no direction repairs nothing), the flagged images the learned directions were estimated from (uint8
    N x H x W x C, so a later observation re-estimates from all of them: exact in ``ordered`` mode, and what the
    label-free ranking folds over), and the ranking that chose the repaired layers.
    """

    sets: dict[str, DirectionSet]
    flagged: np.ndarray | None = None
    ranking: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sets:
            raise ValueError("a layered set needs at least one layer")

    def to_bytes(self) -> bytes:
        arrays: dict[str, Any] = {"layers": np.array(list(self.sets), dtype="U64"),
                                  "ranking": np.array(json.dumps(self.ranking))}
        for i, ds in enumerate(self.sets.values()):
            arrays.update(ds.arrays(f"{i}/"))
        if self.flagged is not None:
            arrays["flagged"] = np.asarray(self.flagged, dtype=np.uint8)
        return _npz(arrays)

    @classmethod
    def from_bytes(cls, payload: bytes) -> LayeredSet:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            if "layers" not in data.files:  # the one-layer format: the split layer's set
                return cls({SPLIT: DirectionSet.of_arrays(data)})
            sets = {str(layer): DirectionSet.of_arrays(data, f"{i}/") for i, layer in enumerate(data["layers"])}
            flagged = data["flagged"].copy() if "flagged" in data.files else None
            return cls(sets, flagged, json.loads(str(data["ranking"])))

    def at(self, split_layer: str) -> dict[str, DirectionSet]:
        """The sets by layer name, a one-layer version's set named ``split_layer``."""
        return {split_layer if layer == SPLIT else layer: ds for layer, ds in self.sets.items()}

    def counts(self, split_layer: str) -> dict[str, int]:
        """How many directions each layer holds."""
        return {layer: len(ds.directions) for layer, ds in self.at(split_layer).items()}


@dataclass(frozen=True)
class Version:
    number: int
    sha256: str
    layered: LayeredSet
    header: dict

    @property
    def directions(self) -> DirectionSet:
        """The set of a one-layer version (a StoreError for a version with several layers: use ``layered``)."""
        if len(self.layered.sets) != 1:
            raise StoreError(f"version {self.number} holds {len(self.layered.sets)} layers")
        return next(iter(self.layered.sets.values()))


@dataclass(frozen=True)
class LiveState:
    """What a store commits to, what of it can be verified now, and the damage found on the way.

    ``version``/``sha256``: the committed live version (``CURRENT``, checked against the history).
    ``verified``: the newest committed version whose file verifies, which is what an instance that starts now
    applies; equal to ``version`` unless that file is damaged; None when no committed version verifies (an
    instance then keeps what it has). ``damage``: one line per problem, e.g. "CURRENT unreadable".
    """

    version: int
    sha256: str
    verified: int | None
    damage: tuple[str, ...] = ()


def _line_checksum(entry: dict) -> str:
    body = json.dumps({k: v for k, v in entry.items() if k != "check"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _parse_pointer(raw: bytes) -> tuple[int, str] | None:
    try:
        data = json.loads(raw)
        number, sha = data["version"], data["sha256"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(number, int) or isinstance(number, bool) or number < 0 or not isinstance(sha, str):
        return None
    return number, sha


class DirectionStore:
    """Reads and writes one store directory. Cheap to construct; safe across processes.

    ``on_damage``, when given, hears of each damaged part this object meets, once per distinct damage (a
    reader meets the same torn line on every read): a stage passes its metrics' ``store_error``.
    """

    def __init__(self, root: Path, on_damage: DamageListener | None = None) -> None:
        self.root = Path(root)
        self.on_damage = on_damage
        self._damage_seen: set[tuple[str, tuple]] = set()
        self.versions_dir = self.root / "versions"
        self.history_path = self.root / "history.jsonl"
        self.current_path = self.root / "CURRENT"
        self.instances_dir = self.root / INSTANCES_DIR
        self.registry = InstanceRegistry(self.instances_dir)
        self._lock_depth = 0

    # -- layout ---------------------------------------------------------------------------
    def ensure(self) -> DirectionStore:
        for d in (self.root, self.versions_dir, self.instances_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def version_path(self, number: int) -> Path:
        return self.versions_dir / f"{number:08d}.fire"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (control instances, CLI tools, other servers on a shared volume).

        Re-entrant for this object, so a read-modify-commit sequence can hold it across commit().
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.ensure()
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _damaged(self, kind: str, *key: object) -> None:
        """Tell ``on_damage`` of damage this object meets for the first time (``key`` tells damages apart)."""
        if self.on_damage is not None and (kind, key) not in self._damage_seen:
            self._damage_seen.add((kind, key))
            self.on_damage(kind)

    # -- versions -------------------------------------------------------------------------
    def read_version(self, number: int) -> Version:
        """Load and verify one version file; raises StoreError if it is missing, partial or corrupt."""
        path = self.version_path(number)
        name = path.relative_to(self.root)  # messages reach control clients: no absolute server paths
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"version {number} does not exist ({name})") from None
        except OSError as exc:
            raise StoreError(f"version {number}: {name} unreadable ({exc.strerror})") from None
        head, sep, payload = raw.partition(b"\n")
        try:
            header = json.loads(head)
        except ValueError:
            header = None
        digest = hashlib.sha256(payload).hexdigest()
        if not sep or not isinstance(header, dict) or header.get("magic") not in MAGICS \
                or header.get("version") != number:
            self._damaged(CHECKSUM, number, hashlib.sha256(raw).hexdigest())
            problem = f"unreadable header in {name}" if header is None else f"{name} is not a direction-set file"
            raise StoreError(f"version {number}: {problem}")
        if digest != header.get("sha256") or len(payload) != header.get("size"):
            self._damaged(CHECKSUM, number, digest)
            raise StoreError(f"version {number}: checksum mismatch in {name} (partial or corrupt file); not served")
        try:
            layered = LayeredSet.from_bytes(payload)
        except (ValueError, KeyError, OSError) as exc:
            self._damaged(CHECKSUM, number, digest)
            raise StoreError(f"version {number}: unreadable payload in {name} ({exc})") from None
        return Version(number, digest, layered, header)

    def verified_version(self, number: int, sha256: str = "") -> Version:
        """:meth:`read_version`, and its checksum must be ``sha256`` (the committed one) when given."""
        version = self.read_version(number)
        if sha256 and version.sha256 != sha256:
            self._damaged(CHECKSUM, number, version.sha256)
            raise StoreError(f"version {number}: its checksum differs from the committed one; not served")
        return version

    def _write_version(self, number: int, directions: DirectionSet | LayeredSet, meta: dict) -> str:
        payload = directions.to_bytes()
        digest = hashlib.sha256(payload).hexdigest()
        magic = MAGIC_LAYERED if isinstance(directions, LayeredSet) else MAGIC
        header = {"magic": magic, "version": number, "sha256": digest, "size": len(payload), **meta}
        atomic_write(self.version_path(number), json.dumps(header).encode() + b"\n" + payload)
        return digest

    # -- history: the commit point ---------------------------------------------------------
    def history(self) -> list[dict]:
        """Valid audit entries in order; a torn or corrupt line (crash mid-append) is skipped and logged."""
        entries, torn = self._read_history()
        for line in torn:
            LOG.warning("store %s: history line %d is torn or corrupt; ignored", self.root, line)
        return [entry for _, entry in entries]

    def _read_history(self) -> tuple[list[tuple[int, dict]], list[int]]:
        """(line number, entry) of every valid line, and the numbers of torn or corrupt lines."""
        try:
            text = self.history_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return [], []
        entries, torn = [], []
        lines = text.splitlines()
        for index, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
                valid = isinstance(entry, dict) and entry.get("check") == _line_checksum(entry) \
                    and isinstance(entry.get("live"), int)
            except ValueError:
                valid = False
            if valid:
                entries.append((index, entry))
            else:
                torn.append(index)
                # A last line without its newline may be an append in progress: damage only once it is followed.
                if index < len(lines) or text.endswith("\n"):
                    self._damaged(TORN_LINE, index, hashlib.sha256(line.encode()).hexdigest())
        return entries, torn

    def _append_history(self, entry: dict) -> dict:
        entry = {**entry, "time": time.time()}
        entry["check"] = _line_checksum(entry)
        with open(self.history_path, "ab") as handle:
            # A previous crash may have left a torn last line: start on a fresh line.
            if handle.tell() and not self.history_path.read_bytes().endswith(b"\n"):
                handle.write(b"\n")
            handle.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        return entry

    def resolve(self) -> LiveState:
        """What is committed, what of it verifies, and what is damaged; reads every version it needs to check.

        The committed live version is ``CURRENT`` when it agrees with the history's last valid line. When they
        differ, the history wins (a crash between its line and ``CURRENT``), unless the history's later lines
        are damaged and ``CURRENT`` names a version that verifies: ``CURRENT`` is written only after the line
        that commits it, so it is then the newer record. An unreadable ``CURRENT`` defers to the history.
        """
        entries, torn = self._read_history()
        damage = [f"history line {line} torn or corrupt" for line in torn]
        pointer = self.read_pointer()
        last_line, last = entries[-1] if entries else (0, None)
        from_history = (int(last["live"]), str(last.get("sha256", ""))) if last else (0, "")
        if pointer is None:
            if self.current_path.exists() or last is not None:
                damage.append("CURRENT unreadable" if self.current_path.exists() else "CURRENT missing")
            committed = from_history
        elif last is None or pointer == from_history:
            committed = pointer
        elif any(line > last_line for line in torn) and self._verifies(*pointer):
            committed = pointer
        else:
            committed = from_history
            damage.append(f"CURRENT names version {pointer[0]}, the history version {committed[0]}")
        verified: int | None = committed[0]
        if not self._verifies(*committed, damage=damage):
            # The newest earlier committed version that verifies; never version 0 by way of damage.
            candidates = [(int(e["live"]), str(e.get("sha256", ""))) for _, e in reversed(entries)]
            verified = next((n for n, sha in candidates if n and n != committed[0] and self._verifies(n, sha)), None)
            if verified is None:
                damage.append("no committed version verifies")
        return LiveState(committed[0], committed[1], verified, tuple(damage))

    def _verifies(self, number: int, sha256: str, damage: list[str] | None = None) -> bool:
        if number == 0:
            return True
        try:
            self.verified_version(number, sha256)
        except StoreError as exc:
            if damage is not None:
                damage.append(str(exc))
            return False
        return True

    def used_nonce(self, nonce: str, since: float) -> bool:
        """Whether a commit since ``since`` (seconds since the epoch) recorded this request nonce (a replay)."""
        return any(e.get("nonce") == nonce and float(e.get("time", 0)) >= since for e in self.history())

    def committed_at(self, number: int, sha256: str = "") -> float | None:
        """When ``number`` (with ``sha256``, when given) last became live: the time of its newest history line."""
        for _, entry in reversed(self._read_history()[0]):
            if entry["live"] == number and (not sha256 or entry.get("sha256", "") == sha256):
                time_ = entry.get("time")
                return float(time_) if isinstance(time_, (int, float)) else None
        return None

    def live_version(self) -> int:
        """The version an instance starting now applies (0 when none verifies)."""
        return self.resolve().verified or 0

    def _publish(self, number: int, sha: str) -> None:
        atomic_write(self.current_path, json.dumps({"version": number, "sha256": sha}).encode())

    def initialize(self) -> None:
        """A new store: no version yet (version 0, no direction); an existing one: ``CURRENT`` repaired if needed."""
        self.ensure()
        if not self.current_path.exists():
            self._publish(0, "")
        self.repair_pointer()

    def repair_pointer(self) -> None:
        """Make CURRENT name the committed version (after a crash between the two writes, or when unreadable).

        Only a committed version that verifies is published: a damaged one is never replaced by an older one
        here, so running instances keep the version they verified.
        """
        with self.locked():
            state = self.resolve()
            if state.verified == state.version and self.read_pointer() != (state.version, state.sha256):
                LOG.warning("store %s: CURRENT rewritten to version %d from the history", self.root, state.version)
                self._publish(state.version, state.sha256)

    def read_pointer(self) -> tuple[int, str] | None:
        """CURRENT's (version, sha256); None when it is missing, empty or unreadable: damage, never "version 0"."""
        try:
            raw = self.current_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raw = str(exc.errno).encode()
            pointer = None
        else:
            pointer = _parse_pointer(raw)
        if pointer is None:
            self._damaged(UNREADABLE_POINTER, hashlib.sha256(raw).hexdigest())
        return pointer

    # -- writers ---------------------------------------------------------------------------
    def commit(self, directions: DirectionSet | LayeredSet, action: str, actor: str = "local",
               note: dict | None = None) -> int:
        """Write a new version and make it live: one set (the split layer's), or every layer's set at once under one
        number. Returns its number."""
        with self.locked():
            existing = [int(p.stem) for p in self.versions_dir.glob("*.fire") if p.stem.isdigit()]
            history = self.history()
            number = max([0, *existing, *(int(e.get("version", 0)) for e in history)]) + 1
            sha = self._write_version(number, directions, {"action": action, "actor": actor, "time": time.time()})
            self._append_history({"action": action, "version": number, "live": number, "sha256": sha,
                                  "actor": actor, **(note or {})})
            self._publish(number, sha)
            return number

    def rollback(self, number: int, actor: str = "local", note: dict | None = None) -> int:
        """Make an earlier committed version live again (it keeps its number)."""
        with self.locked():
            committed = {int(e["version"]) for e in self.history() if e.get("action") != "rollback"}
            if number != 0 and number not in committed:
                raise StoreError(f"version {number} was never committed; see `fire ctl history`")
            sha = self.read_version(number).sha256 if number else ""
            self._append_history({"action": "rollback", "version": number, "live": number, "sha256": sha,
                                  "actor": actor, **(note or {})})
            self._publish(number, sha)
            return number

    # -- repair instances ------------------------------------------------------------------
    def follower(self, instance: str) -> InstanceFollower:
        """What repair instance ``instance`` follows the store with (a crash's stale ``CURRENT`` repaired first)."""
        self.ensure()
        self.repair_pointer()
        return InstanceFollower(self, instance)

    def report_instance(self, instance: str, version: int, lag_s: float | None = None) -> None:
        self.registry.report(instance, version, lag_s)

    def instance_entries(self) -> list[dict]:
        """Every instance entry, each with ``alive``: True/False on this host, None for another host's."""
        return self.registry.entries()

    def instances(self) -> list[dict]:
        """The instances that run (on this host; every entry of other hosts), each with its applied version."""
        return self.registry.live()


class StoreFollower:
    """What a repair instance uses: notices a newly committed version with one ``stat`` per batch.

    ``poll()`` returns True when the version to apply changed; ``current`` is then the verified new version
    (None for version 0: no direction). Fails closed: when ``CURRENT`` is unreadable or names a version that
    does not verify, the history decides (:meth:`DirectionStore.resolve`), and when nothing newer verifies the
    instance keeps the version it has. Damage is logged, never applied.
    """

    def __init__(self, store: DirectionStore) -> None:
        self.store = store
        self._stamp: tuple[int, int, int] | None = None
        self.current: Version | None = None

    @property
    def version(self) -> int:
        return self.current.number if self.current else 0

    def poll(self) -> bool:
        try:
            st = self.store.current_path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp == self._stamp:
            return False
        if stamp is None and self._stamp is not None and self._stamp[0] == -1:
            return False  # still missing: already resolved from the history
        self._stamp = stamp or (-1, 0, 0)
        pointer = self.store.read_pointer()
        if pointer is not None:
            number, sha = pointer
            if number == 0:
                return self._apply(None)
            if self.current is not None and (number, sha) == (self.current.number, self.current.sha256):
                return False
            try:
                return self._apply(self.store.verified_version(number, sha))
            except StoreError as exc:
                LOG.error("store %s: %s", self.store.root, exc)
        state = self.store.resolve()
        for line in state.damage:
            LOG.error("store %s: %s", self.store.root, line)
        if state.verified is None:
            LOG.error("store %s: no committed version verifies; keeping version %d", self.store.root, self.version)
            return False
        if state.verified == 0:
            return self._apply(None)
        try:
            return self._apply(self.store.verified_version(state.verified))
        except StoreError as exc:  # damaged between resolve() and now
            LOG.error("store %s: %s; keeping version %d", self.store.root, exc, self.version)
            return False

    def _apply(self, version: Version | None) -> bool:
        if (version.number if version else 0) == self.version and \
                (version is None or self.current is None or version.sha256 == self.current.sha256):
            return False
        self.current = version
        return True


class InstanceFollower(StoreFollower):
    """A repair instance's follower: also records in the instance registry which version the instance applies and
    how long after its commit (``committed``: that commit's time; None for the version it started with, which was
    no propagation). It has no thread of its own: the caller polls."""

    def __init__(self, store: DirectionStore, instance: str) -> None:
        super().__init__(store)
        self.instance = instance
        self.committed: float | None = None
        self._reported: tuple[int, str] | None = None

    def poll(self) -> bool:
        changed = super().poll()
        applied = (self.version, self.current.sha256 if self.current else "")
        if self._reported != applied:
            self.committed = None if self._reported is None else self.store.committed_at(*applied)
            lag = None if self.committed is None else max(0.0, time.time() - self.committed)  # clock skew: >= 0
            self.store.report_instance(self.instance, self.version, lag)
            self._reported = applied
        return changed

    def close(self) -> None:
        """Withdraw the instance from the registry (its model is unloading)."""
        (self.store.instances_dir / f"{self.instance}.json").unlink(missing_ok=True)


def validate_direction_set(ds: DirectionSet, dim: int, max_norm: float, max_alpha: float, max_directions: int) -> None:
    """Reject anything a repair stage must never apply; raises ValueError naming the problem."""
    if ds.center.shape != (dim,):
        raise ValueError(f"center has shape {ds.center.shape}; the latent has {dim} values")
    if not np.isfinite(ds.center).all():
        raise ValueError("center has NaN or Inf values")
    if len(ds.directions) > max_directions:
        raise ValueError(f"{len(ds.directions)} directions; at most {max_directions}")
    for d in ds.directions:
        beta = d.beta.reshape(-1)
        if beta.numel() != dim:
            raise ValueError(f"direction {d.name!r} has {beta.numel()} values; the latent has {dim}")
        if not bool(torch.isfinite(beta).all()):
            raise ValueError(f"direction {d.name!r} has NaN or Inf values")
        norm = float(beta.norm())
        if not 0.0 < norm <= max_norm:
            raise ValueError(f"direction {d.name!r} has norm {norm:.4g}; allowed (0, {max_norm:g}]")
        if not (np.isfinite(d.alpha) and 0.0 <= d.alpha <= max_alpha):
            raise ValueError(f"direction {d.name!r} has alpha {d.alpha}; allowed [0, {max_alpha:g}]")
        if d.mode not in MODES:
            raise ValueError(f"direction {d.name!r} has mode {d.mode!r}; allowed {MODES}")
        if not np.isfinite(d.threshold):
            raise ValueError(f"direction {d.name!r} has a non-finite threshold")
