"""A versioned, checksummed, crash-safe store of FIRE direction sets, shared by processes.

Layout of a store directory (it may sit on a volume shared by several servers):

    versions/00000007.fire   one file per version: a JSON header line (with the SHA-256 of the
                             payload) followed by an .npz payload; written to a temp file, fsynced,
                             renamed, directory fsynced
    history.jsonl            the audit log and the commit point: one JSON line per change, each with
                             its own checksum; the live version is the last valid line's ``live``
    CURRENT                  a small pointer to the live version, rewritten atomically after the
                             history line; repair stages poll it with one ``stat`` per batch
    instances/<id>.json      which version each repair instance is applying (for ``status``)
    .lock                    writers serialise on an ``flock`` of this file

A crash at any point leaves either the previous or the new version live, never a partial one: a
version only becomes live through a fully written, fsynced history line, and every payload is
verified against its checksum before it is served.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fire_backend.fire import MODES, Direction, EstimatorState

LOG = logging.getLogger("fire_backend.store")
MAGIC = "fire-backend/direction-set/v1"


class StoreError(Exception):
    """A store operation could not be carried out; the store is unchanged."""


@dataclass
class DirectionSet:
    """What a version holds: the clean centroid, the live directions, and the estimator state."""

    center: np.ndarray  # float32 (D,)
    directions: list[Direction] = field(default_factory=list)
    estimator: EstimatorState | None = None

    @property
    def dim(self) -> int:
        return int(self.center.size)

    def to_bytes(self) -> bytes:
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
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes) -> DirectionSet:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            directions = [
                Direction(torch.from_numpy(data["betas"][i].copy()), float(data["alphas"][i]), str(data["modes"][i]),
                          float(data["thresholds"][i]), str(data["names"][i]))
                for i in range(len(data["betas"]))
            ]
            estimator = None
            if "est_kind" in data.files:
                estimator = EstimatorState(str(data["est_kind"]), data["est_poisoned_mean"].copy(),
                                           int(data["est_poisoned_count"]), data["est_clean_mean"].copy(),
                                           int(data["est_clean_count"]))
            return cls(data["center"].copy(), directions, estimator)


@dataclass(frozen=True)
class Version:
    number: int
    sha256: str
    directions: DirectionSet
    header: dict


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path``, fsync, rename over it, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _line_checksum(entry: dict) -> str:
    body = json.dumps({k: v for k, v in entry.items() if k != "check"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class DirectionStore:
    """Reads and writes one store directory. Cheap to construct; safe across processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.history_path = self.root / "history.jsonl"
        self.current_path = self.root / "CURRENT"
        self.instances_dir = self.root / "instances"
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

    # -- versions -------------------------------------------------------------------------
    def read_version(self, number: int) -> Version:
        """Load and verify one version file; raises StoreError if it is missing, partial or corrupt."""
        path = self.version_path(number)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"version {number} does not exist ({path})") from None
        head, sep, payload = raw.partition(b"\n")
        try:
            header = json.loads(head)
        except ValueError:
            raise StoreError(f"version {number}: unreadable header in {path}") from None
        if not sep or header.get("magic") != MAGIC or header.get("version") != number:
            raise StoreError(f"version {number}: {path} is not a direction-set file")
        digest = hashlib.sha256(payload).hexdigest()
        if digest != header.get("sha256") or len(payload) != header.get("size"):
            raise StoreError(f"version {number}: checksum mismatch in {path} (partial or corrupt file); not served")
        return Version(number, digest, DirectionSet.from_bytes(payload), header)

    def _write_version(self, number: int, directions: DirectionSet, meta: dict) -> str:
        payload = directions.to_bytes()
        digest = hashlib.sha256(payload).hexdigest()
        header = {"magic": MAGIC, "version": number, "sha256": digest, "size": len(payload), **meta}
        atomic_write(self.version_path(number), json.dumps(header).encode() + b"\n" + payload)
        return digest

    # -- history: the commit point ---------------------------------------------------------
    def history(self) -> list[dict]:
        """Valid audit entries in order; a torn or corrupt line (crash mid-append) is skipped and logged."""
        if not self.history_path.exists():
            return []
        entries = []
        for index, line in enumerate(self.history_path.read_text().splitlines()):
            try:
                entry = json.loads(line)
                valid = entry.get("check") == _line_checksum(entry)
            except ValueError:
                valid = False
            if not valid:
                LOG.warning("store %s: history line %d is torn or corrupt; ignored", self.root, index + 1)
                continue
            entries.append(entry)
        return entries

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

    def live_entry(self) -> dict | None:
        """The last committed history entry whose version file verifies (version 0: none)."""
        for entry in reversed(self.history()):
            number = int(entry["live"])
            if number == 0:
                return entry
            try:
                self.read_version(number)
                return entry
            except StoreError as exc:
                LOG.error("store %s: %s; falling back to the previous committed version", self.root, exc)
        return None

    def live_version(self) -> int:
        entry = self.live_entry()
        return int(entry["live"]) if entry else 0

    def _publish(self, number: int, sha: str) -> None:
        atomic_write(self.current_path, json.dumps({"version": number, "sha256": sha}).encode())

    def initialize(self) -> None:
        """A new store: no version yet (version 0, no direction)."""
        self.ensure()
        if not self.current_path.exists():
            self._publish(0, "")

    def repair_pointer(self) -> None:
        """Make CURRENT agree with the history (after a crash between the two writes)."""
        with self.locked():
            entry = self.live_entry()
            number = int(entry["live"]) if entry else 0
            sha = entry.get("sha256", "") if entry else ""
            if self.read_pointer() != (number, sha):
                self._publish(number, sha)

    def read_pointer(self) -> tuple[int, str]:
        try:
            data = json.loads(self.current_path.read_text())
            return int(data["version"]), str(data["sha256"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0, ""

    # -- writers ---------------------------------------------------------------------------
    def commit(self, directions: DirectionSet, action: str, actor: str = "local", note: dict | None = None) -> int:
        """Write a new version and make it live. Returns its number."""
        with self.locked():
            existing = [int(p.stem) for p in self.versions_dir.glob("*.fire") if p.stem.isdigit()]
            history = self.history()
            number = max([0, *existing, *(int(e.get("version", 0)) for e in history)]) + 1
            sha = self._write_version(number, directions, {"action": action, "actor": actor, "time": time.time()})
            self._append_history({"action": action, "version": number, "live": number, "sha256": sha,
                                  "actor": actor, **(note or {})})
            self._publish(number, sha)
            return number

    def rollback(self, number: int, actor: str = "local") -> int:
        """Make an earlier committed version live again (it keeps its number)."""
        with self.locked():
            committed = {int(e["version"]) for e in self.history() if e.get("action") != "rollback"}
            if number != 0 and number not in committed:
                raise StoreError(f"version {number} was never committed; see `fire ctl history`")
            sha = self.read_version(number).sha256 if number else ""
            self._append_history({"action": "rollback", "version": number, "live": number, "sha256": sha,
                                  "actor": actor})
            self._publish(number, sha)
            return number

    # -- repair instances ------------------------------------------------------------------
    def report_instance(self, instance: str, version: int) -> None:
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.instances_dir / f"{instance}.json",
                     json.dumps({"instance": instance, "version": version, "pid": os.getpid(),
                                 "time": time.time()}).encode())

    def instances(self) -> list[dict]:
        out = []
        for path in sorted(self.instances_dir.glob("*.json")):
            with contextlib.suppress(ValueError, FileNotFoundError):
                out.append(json.loads(path.read_text()))
        return out


class StoreFollower:
    """What a repair instance uses: notices a newly committed version with one ``stat`` per batch.

    ``poll()`` returns True when the live version changed; ``current`` is then the verified new
    version (None for version 0: no direction). A corrupt version is logged and never served; the
    previous one stays in force.
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
            st = os.stat(self.store.current_path)
        except FileNotFoundError:
            return False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        number, sha = self.store.read_pointer()
        if number == self.version:
            return False
        if number == 0:
            self.current = None
            return True
        try:
            version = self.store.read_version(number)
        except StoreError as exc:
            LOG.error("%s", exc)
            return False
        if sha and version.sha256 != sha:
            LOG.error("version %d: checksum differs from the committed one; not served", number)
            return False
        self.current = version
        return True


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
