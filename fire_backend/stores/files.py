"""The direction store's file engine: versioned, checksummed, crash-safe, shared by processes; and the follower a
repair instance keeps on it.

Layout of a store directory (it may sit on a volume shared by several servers):

    versions/00000007.fire   one file per version: a JSON header line (with the SHA-256 of the
                             payload) followed by an .npz payload; written to a temp file, fsynced,
                             linked under its final name (never over another), directory fsynced. The
                             payload holds one direction set per configured layer (:class:`LayeredSet`),
                             committed together (versions of the older one-layer format hold the split
                             layer's alone; still read). Only the newest ``retain`` committed versions keep
                             their file (compaction); the history keeps every line
    history.jsonl            the audit log: one JSON line per change, each with its own checksum; the
                             live version is the last valid line's ``live``. Read from its end: what a
                             commit or a repair instance needs is in the last lines, so their cost does
                             not grow with the history
    CURRENT                  a small pointer to the live version, rewritten atomically after the
                             history line; repair stages poll it with one ``stat`` per batch
    nonces/<hash>            one empty-ish file per control request accepted (its credential's nonce),
                             created exclusively: a replayed request finds its nonce taken, on any
                             server on this store and after a restart; pruned after ``2 x`` the window
    .lock                    writers serialise on an ``flock`` of this file

A commit is acknowledged exactly when it is durable: the version file, the fsynced history line and the
renamed ``CURRENT`` are all in place. If any step fails (a full disk), the steps already taken are undone
(the history truncated back, the version file removed) and the error says nothing was committed. A crash
between the history line and ``CURRENT`` leaves a commit that was never acknowledged; the next start
finishes it from the history.

Nothing inside a store directory is followed through a symbolic link (:mod:`fire_backend.nofollow`), and
nothing here creates a store except :meth:`DirectionStore.initialize` (``fire repo build``): a store
directory that went missing, emptied or unreadable is damage, never a new store at version 0.

The store fails closed: :meth:`DirectionStore.resolve` works out what is committed and what of it can be
verified (checksum, and with ``fits`` the shapes and layer names of the network being served) and names the
damage; version 0 is committed only by a rollback to it, or by a store nothing was ever committed to. A
repair instance keeps the last version it verified whatever the store looks like (:class:`StoreFollower`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fire_backend.defaults import RETAIN_VERSIONS
from fire_backend.nofollow import TMP_PREFIX, Directory, describe
from fire_backend.stores.damage import CHECKSUM, SHAPE, TORN_LINE, UNREADABLE_POINTER, DamageListener
from fire_backend.stores.format import (
    MAGIC_LAYERED,
    MAGICS,
    DirectionSet,
    FitCheck,
    LayeredSet,
    LiveState,
    StoreError,
    Version,
    committable,
)
from fire_backend.stores.instances import INSTANCES_DIR, InstanceRegistry

LOG = logging.getLogger("fire_backend.store")
VERSIONS, HISTORY, CURRENT, NONCES, LOCK = "versions", "history.jsonl", "CURRENT", "nonces", ".lock"
#: compaction runs after every this many commits
COMPACT_EVERY = 16
#: temporary files older than this are left-overs of a crash, removed by compaction
STALE_TMP_S = 3600.0
#: the action of the versions ``fire repo build`` commits: the repository's starting point, never compacted away
BUILD_ACTION = "build"
#: bytes of a version file read to see its header line (a JSON object of a few hundred bytes)
HEADER_BYTES = 4096
#: bytes of the history read at a time, from its end
HISTORY_BLOCK = 16 * 1024
#: how many earlier committed versions resolve() tries when the live one does not verify
FALLBACK_VERSIONS = 16
#: free bytes a store's disk needs beyond two versions' payloads before resolve() names it full
SPACE_MARGIN = 64 * 1024


def _line_checksum(entry: dict) -> str:
    body = json.dumps({k: v for k, v in entry.items() if k != "check"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _entry(line: bytes) -> dict | None:
    """A history line's entry when it is valid (its checksum holds and it names the live version), else None."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if isinstance(entry, dict) and entry.get("check") == _line_checksum(entry) and isinstance(entry.get("live"), int):
        return entry
    return None


def _parse_pointer(raw: bytes) -> tuple[int, str] | None:
    try:
        data = json.loads(raw)
        number, sha = data["version"], data["sha256"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(number, int) or isinstance(number, bool) or number < 0 or not isinstance(sha, str):
        return None
    return number, sha


def _version_name(number: int) -> str:
    return f"{VERSIONS}/{number:08d}.fire"


def _store_error(what: str, exc: OSError) -> StoreError:
    return StoreError(f"{what}: {describe(exc)}; nothing was committed")


@dataclass
class _Tail:
    """What the end of the history says: its last valid entry (and that entry's offset), and the torn lines after
    it (offsets). ``readable``: the file could be read (``problem`` says why not); ``empty``: it holds no line."""

    last: dict | None = None
    last_offset: int = 0
    torn_after: list[int] = field(default_factory=list)
    readable: bool = True
    problem: str = ""
    empty: bool = False


class DirectionStore:
    """Reads and writes one store directory. Cheap to construct; safe across processes.

    ``on_damage``, when given, hears of each damaged part this object meets, once per distinct damage (a
    reader meets the same torn line on every read): a stage passes its metrics' ``store_error``. ``fits`` checks a
    version against the network being served (at commit and at every read). ``registry``: where repair instances
    record what they apply (the repository's ``artifacts/instances``; by default ``instances/`` in the store).
    ``retain``: how many of the newest committed versions keep their payload file.
    """

    def __init__(self, root: Path, on_damage: DamageListener | None = None, *, fits: FitCheck | None = None,
                 registry: InstanceRegistry | None = None, retain: int = RETAIN_VERSIONS) -> None:
        if retain < 1:
            raise ValueError(f"retain must keep at least 1 version, got {retain}")
        self.root = Path(root)
        self.files = Directory(self.root)
        self.on_damage = on_damage
        self.fits = fits
        self.retain = retain
        self._damage_seen: set[tuple[str, tuple]] = set()
        self.versions_dir = self.root / VERSIONS
        self.history_path = self.root / HISTORY
        self.current_path = self.root / CURRENT
        self.registry = registry or InstanceRegistry(self.root / INSTANCES_DIR)
        self.instances_dir = self.registry.directory
        self._lock_depth = 0
        self._nonces_pruned = 0.0

    # -- layout ---------------------------------------------------------------------------
    def ensure(self) -> DirectionStore:
        """Create the store's folders (the directory with its parents): only where a store is created."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (VERSIONS, NONCES):
            self.files.mkdir(folder)
        return self

    def version_path(self, number: int) -> Path:
        return self.root / _version_name(number)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (control instances, CLI tools, other servers on a shared volume).

        Re-entrant for this object, so a read-modify-commit sequence can hold it across commit(). A store directory
        that is missing or unreadable is a StoreError: nothing is created to lock.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.files.locked(LOCK))
            except OSError as exc:
                problem = self._root_problem() or f"{LOCK}: {describe(exc)}"
                raise StoreError(f"the store cannot be locked ({problem}); nothing was committed") from None
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def _damaged(self, kind: str, *key: object) -> None:
        """Tell ``on_damage`` of damage this object meets for the first time (``key`` tells damages apart)."""
        if self.on_damage is not None and (kind, key) not in self._damage_seen:
            self._damage_seen.add((kind, key))
            self.on_damage(kind)

    # -- versions -------------------------------------------------------------------------
    def read_version(self, number: int) -> Version:
        """Load and verify one version file (checksum, and ``fits``); StoreError if it is missing, partial, corrupt
        or does not fit the served network."""
        name = _version_name(number)  # messages reach control clients: no absolute server paths
        try:
            raw = self.files.read(name)
        except FileNotFoundError:
            raise StoreError(f"version {number} does not exist ({name}; the store keeps the newest {self.retain} "
                             "versions' files)") from None
        except OSError as exc:  # not the file's content: fire_store_degraded says so, not a damage count
            raise StoreError(f"version {number}: {name} unreadable ({describe(exc)})") from None
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
        self._check_fits(number, digest, layered)
        return Version(number, digest, layered, header)

    def _check_fits(self, number: int, digest: str, layered: LayeredSet) -> None:
        if self.fits is None:
            return
        try:
            self.fits(layered)
        except ValueError as exc:
            self._damaged(SHAPE, number, digest)
            raise StoreError(f"version {number} does not fit the served network ({exc}); not served") from None

    def verified_version(self, number: int, sha256: str = "") -> Version:
        """:meth:`read_version`, and its checksum must be ``sha256`` (the committed one) when given."""
        version = self.read_version(number)
        if sha256 and version.sha256 != sha256:
            self._damaged(CHECKSUM, number, version.sha256)
            raise StoreError(f"version {number}: its checksum differs from the committed one; not served")
        return version

    def _write_version(self, number: int, payload: bytes, meta: dict) -> tuple[int, str]:
        """Write the version file under the first free number from ``number`` on; (its number, its SHA-256)."""
        digest = hashlib.sha256(payload).hexdigest()
        while True:
            header = {"magic": MAGIC_LAYERED, "version": number, "sha256": digest, "size": len(payload), **meta}
            try:
                self.files.publish(_version_name(number), json.dumps(header).encode() + b"\n" + payload)
            except FileExistsError:  # a number burnt by a crash mid-commit: never reused
                number += 1
                continue
            return number, digest

    # -- history --------------------------------------------------------------------------
    def history(self) -> list[dict]:
        """Valid audit entries in order; a torn or corrupt line (crash mid-append) is skipped and logged."""
        entries, torn = self._read_history()
        for line in torn:
            LOG.warning("store %s: history line %d is torn or corrupt; ignored", self.root, line)
        return [entry for _, entry in entries]

    def _read_history(self) -> tuple[list[tuple[int, dict]], list[int]]:
        """(line number, entry) of every valid line, and the numbers of torn or corrupt lines (the whole file)."""
        try:
            text = self.files.read(HISTORY)
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            raise StoreError(f"{HISTORY} unreadable ({describe(exc)})") from None
        entries, torn = [], []
        lines = text.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for index, line in enumerate(lines, start=1):
            entry = _entry(line)
            if entry is not None:
                entries.append((index, entry))
                continue
            torn.append(index)
            # A last line without its newline may be an append in progress: damage only once it is followed.
            if index < len(lines) or text.endswith(b"\n"):
                self._damaged(TORN_LINE, index, hashlib.sha256(line).hexdigest())
        return entries, torn

    def _backwards(self) -> Iterator[tuple[int, bytes, bool]]:
        """(offset, line, finished) of every history line from the last to the first, read in blocks from the end;
        ``finished``: the line ends with its newline (a last line without one may be an append in progress)."""
        end: int | None = None
        carry = b""
        first = True
        while True:
            data, start = self.files.read_tail(HISTORY, HISTORY_BLOCK, end)
            chunk = data + carry
            lines = chunk.split(b"\n")
            if start > 0:
                carry, lines, base = lines[0], lines[1:], start + len(lines[0]) + 1
            else:
                carry, base = b"", 0
            offsets, offset = [], base
            for line in lines:
                offsets.append(offset)
                offset += len(line) + 1
            for index in range(len(lines) - 1, -1, -1):
                line = lines[index]
                last = first and index == len(lines) - 1
                if line:
                    yield offsets[index], line, not last
                first = first and not last
            if start == 0:
                return
            end = start

    def _line_number(self, offset: int) -> int:
        """The 1-based line number of the line at ``offset`` (reads the history up to it: for damage messages)."""
        data, _ = self.files.read_tail(HISTORY, offset, offset)
        return data.count(b"\n") + 1

    def _tail(self) -> _Tail:
        """The history's last valid entry and the torn lines after it, read from the end."""
        tail = _Tail()
        try:
            for offset, line, finished in self._backwards():
                entry = _entry(line)
                if entry is not None:
                    tail.last, tail.last_offset = entry, offset
                    break
                if finished:
                    tail.torn_after.append(offset)
                    self._damaged(TORN_LINE, offset, hashlib.sha256(line).hexdigest())
            else:
                tail.empty = not tail.torn_after
        except FileNotFoundError:
            tail.readable, tail.problem, tail.empty = False, f"{HISTORY} missing", True
        except OSError as exc:
            tail.readable, tail.problem = False, f"{HISTORY} unreadable ({describe(exc)})"
        return tail

    def _entries_backwards(self) -> Iterator[dict]:
        """Valid history entries from the newest on (stops quietly at an unreadable file)."""
        with contextlib.suppress(OSError):
            for _, line, _ in self._backwards():
                entry = _entry(line)
                if entry is not None:
                    yield entry

    def _line(self, entry: dict) -> bytes:
        entry = {**entry, "time": time.time()}
        entry["check"] = _line_checksum(entry)
        return json.dumps(entry, sort_keys=True).encode() + b"\n"

    # -- what is live -----------------------------------------------------------------------
    def _root_problem(self) -> str | None:
        """Why the store directory cannot be a store (missing, not a directory, unreadable, empty), else None."""
        try:
            names = set(self.files.names())
        except FileNotFoundError:
            return "store directory missing"
        except NotADirectoryError:
            return "the store path is not a directory"
        except OSError as exc:
            return f"store directory unreadable ({describe(exc)})"
        if not names & {CURRENT, HISTORY, VERSIONS}:
            return "store directory empty (no CURRENT, history.jsonl or versions/)"
        return None

    def _has_versions(self) -> bool:
        try:
            return any(name.endswith(".fire") for name in self.files.names(VERSIONS))
        except OSError:
            return False

    def resolve(self) -> LiveState:
        """What is committed, what of it verifies, and what is damaged."""
        return self._resolve()[0]

    def _resolve(self) -> tuple[LiveState, Version | None]:
        """:meth:`resolve`, and the verified version it loaded (None for version 0 or none verifying).

        The committed live version is ``CURRENT`` when it agrees with the history's last valid line. When they
        differ, the history wins (a crash between its line and ``CURRENT``), unless the history's later lines are
        damaged and ``CURRENT`` names a version that verifies: ``CURRENT`` is written only after the line that
        commits it, so it is then the newer record. An unreadable ``CURRENT`` defers to the history. A history that
        is missing or holds no valid line while the store holds versions is damage: ``CURRENT`` is then believed
        only for a version that verifies, and never for version 0.
        """
        problem = self._root_problem()
        if problem is not None:
            return LiveState(None, "", None, (problem,)), None
        damage: list[str] = []
        pointer = self.read_pointer(damage)
        tail = self._tail()
        if tail.torn_after:
            damage += [f"history line {self._line_number(offset)} torn or corrupt"
                       for offset in reversed(tail.torn_after)]
        last = tail.last
        pristine = False
        if last is None:
            has_versions = self._has_versions()
            if not tail.readable and tail.problem != f"{HISTORY} missing":
                damage.append(tail.problem)
            elif (pointer or (0, "")) == (0, "") and not has_versions:
                pristine = True  # nothing was ever committed: version 0 by absence (CURRENT repaired at start)
            elif has_versions or pointer:
                damage.append(f"{HISTORY} missing" if not tail.readable else f"{HISTORY} holds no valid line")
            if pristine:
                committed: tuple[int, str] | None = (0, "")
            else:
                committed = pointer if pointer and pointer[0] else None
        elif pointer is None or pointer == (int(last["live"]), str(last.get("sha256", ""))):
            committed = (int(last["live"]), str(last.get("sha256", "")))
        elif tail.torn_after and pointer[0] and self._loads(*pointer) is not None:
            committed = pointer
        else:
            committed = (int(last["live"]), str(last.get("sha256", "")))
            damage.append(f"CURRENT names version {pointer[0]}, the history version {committed[0]}")
        if committed is None:
            if "no committed version verifies" not in damage:
                damage.append("no committed version verifies")
            return LiveState(None, "", None, tuple(damage)), None
        if committed[0] == 0:
            self._space(damage, 0)
            return LiveState(0, committed[1], 0, tuple(damage), pristine), None
        version = self._loads(*committed, damage=damage)
        if version is not None:
            self._space(damage, int(version.header.get("size", 0)))
            return LiveState(committed[0], committed[1], committed[0], tuple(damage)), version
        # The newest earlier committed version that verifies; never version 0 by way of damage.
        tried = {committed[0]}
        for entry in self._entries_backwards():
            number, sha = int(entry["live"]), str(entry.get("sha256", ""))
            if number in tried or not number:
                continue
            if len(tried) > FALLBACK_VERSIONS:
                break
            tried.add(number)
            version = self._loads(number, sha)
            if version is not None:
                return LiveState(committed[0], committed[1], number, tuple(damage)), version
        damage.append("no committed version verifies")
        return LiveState(committed[0], committed[1], None, tuple(damage)), None

    def _space(self, damage: list[str], version_size: int) -> None:
        """Name a disk too full for the next commit (about two versions' size and a margin): commits would fail."""
        try:
            info = os.statvfs(self.root)
        except OSError:
            return
        free, need = info.f_bavail * info.f_frsize, 2 * version_size + SPACE_MARGIN
        if free < need:
            damage.append(f"store disk full: {free // 1024} KiB free, a commit needs about {need // 1024} KiB")

    def _loads(self, number: int, sha256: str, damage: list[str] | None = None) -> Version | None:
        try:
            return self.verified_version(number, sha256)
        except StoreError as exc:
            if damage is not None:
                damage.append(str(exc))
            return None

    def committed_at(self, number: int, sha256: str = "") -> float | None:
        """When ``number`` (with ``sha256``, when given) last became live: the time of its newest history line."""
        for entry in self._entries_backwards():
            if entry["live"] == number and (not sha256 or entry.get("sha256", "") == sha256):
                time_ = entry.get("time")
                return float(time_) if isinstance(time_, (int, float)) else None
        return None

    def live_version(self) -> int:
        """The version an instance starting now applies (0 when none verifies)."""
        return self.resolve().verified or 0

    def read_pointer(self, damage: list[str] | None = None) -> tuple[int, str] | None:
        """CURRENT's (version, sha256); None when it is missing, empty or unreadable: damage, never "version 0"."""
        try:
            raw = self.files.read(CURRENT)
        except FileNotFoundError:
            if damage is not None:
                damage.append("CURRENT missing")
            return None
        except OSError as exc:
            self._damaged(UNREADABLE_POINTER, exc.errno)
            if damage is not None:
                damage.append(f"CURRENT unreadable ({describe(exc)})")
            return None
        pointer = _parse_pointer(raw)
        if pointer is None:
            self._damaged(UNREADABLE_POINTER, hashlib.sha256(raw).hexdigest())
            if damage is not None:
                damage.append("CURRENT unreadable")
        return pointer

    def _publish(self, number: int, sha: str) -> None:
        self.files.replace(CURRENT, json.dumps({"version": number, "sha256": sha}).encode())

    def initialize(self) -> None:
        """Create a new store (version 0, no direction) or, for an existing one, repair ``CURRENT`` if needed. The
        one place a store is created (``fire repo build``, ``fire serve --store`` of a new directory)."""
        self.ensure()
        if not self.files.exists(HISTORY):
            self.files.create(HISTORY, b"")
        if not self.files.exists(CURRENT) and self._tail().last is None and not self._has_versions():
            self._publish(0, "")
        self.repair_pointer()

    def recover(self) -> None:
        """Finish what a writer killed mid-commit left behind (``CURRENT`` behind the history: a commit that was never
        acknowledged), at a process's start; never creates a store. Best effort: a store that cannot be read or
        written now is damage for ``resolve`` to name, not a reason to fail a start."""
        if self._root_problem() is not None:
            return
        try:
            self.repair_pointer()
        except (StoreError, OSError) as exc:
            LOG.warning("store %s: CURRENT not repaired (%s)", self.root, exc)

    def repair_pointer(self) -> None:
        """Make CURRENT name the committed version (after a crash between the two writes, or when unreadable).

        Only a committed version that verifies is published: a damaged one is never replaced by an older one
        here, so running instances keep the version they verified.
        """
        with self.locked():
            state = self.resolve()
            if state.version is not None and state.verified == state.version \
                    and self.read_pointer() != (state.version, state.sha256):
                LOG.warning("store %s: CURRENT rewritten to version %d from the history", self.root, state.version)
                self._publish(state.version, state.sha256)

    # -- writers ---------------------------------------------------------------------------
    def _next_number(self, tail: _Tail) -> int:
        """The first version number never used: the history's last line records it; older stores are scanned."""
        last = tail.last
        if last is not None and isinstance(last.get("next"), int):
            return max(int(last["next"]), 1)
        used = [int(e.get("version", 0)) for e in self.history()]
        with contextlib.suppress(OSError):
            used += [int(n[:-5]) for n in self.files.names(VERSIONS) if n.endswith(".fire") and n[:-5].isdigit()]
        return max([0, *used]) + 1

    def _make_live(self, entry: dict, number: int, sha: str) -> None:
        """Append ``entry``'s history line and point CURRENT at ``number``: both or neither (a failed step undoes
        the other). StoreError naming the cause when it fails."""
        line = self._line(entry)
        try:
            size = self.files.append(HISTORY, line)
        except OSError as exc:
            raise _store_error(f"{HISTORY} not written", exc) from None
        try:
            self._publish(number, sha)
        except OSError as exc:
            try:
                self.files.truncate(HISTORY, size)
            except OSError as undo:
                raise StoreError(f"CURRENT not written ({describe(exc)}) and the history line not undone "
                                 f"({describe(undo)}): version {number} may be committed; see `fire ctl history`"
                                 ) from None
            raise _store_error("CURRENT not written", exc) from None

    def commit(self, directions: DirectionSet | LayeredSet, action: str, actor: str = "local",
               note: dict | None = None) -> int:
        """Write a new version and make it live: every layer's set at once under one number (a bare set is the split
        layer's). Returns its number once it is durable; StoreError (nothing committed) otherwise."""
        payload = committable(directions, self.fits).to_bytes()
        with self.locked():
            tail = self._tail()
            if not tail.readable and tail.problem != f"{HISTORY} missing":
                raise StoreError(f"{tail.problem}; nothing was committed")
            try:
                self.files.mkdir(VERSIONS)  # inside the locked (so existing) store: a store written before it had one
                number, sha = self._write_version(self._next_number(tail), payload,
                                                  {"action": action, "actor": actor, "time": time.time()})
            except OSError as exc:
                raise _store_error("the version file not written", exc) from None
            entry = {"action": action, "version": number, "live": number, "sha256": sha, "actor": actor,
                     "next": number + 1, **(note or {})}
            try:
                self._make_live(entry, number, sha)
            except StoreError:
                with contextlib.suppress(OSError):
                    self.files.unlink(_version_name(number))
                raise
            if number % COMPACT_EVERY == 0:
                self.compact()
            return number

    def rollback(self, number: int, actor: str = "local", note: dict | None = None) -> int:
        """Make an earlier committed version live again (it keeps its number)."""
        with self.locked():
            history = self.history()
            committed = {int(e["version"]) for e in history if e.get("action") != "rollback"}
            if number != 0 and number not in committed:
                raise StoreError(f"version {number} was never committed; see `fire ctl history`")
            sha = self.read_version(number).sha256 if number else ""
            tail = self._tail()
            entry = {"action": "rollback", "version": number, "live": number, "sha256": sha, "actor": actor,
                     "next": self._next_number(tail), **(note or {})}
            self._make_live(entry, number, sha)
            return number

    def compact(self) -> list[int]:
        """Remove the payload files of versions older than the newest ``retain`` committed ones (never the live one,
        one a recent history line names, nor one ``fire repo build`` committed) and temporary files a crash left
        behind; returns the numbers removed.
        Best effort: a failure is logged, never raised (it runs after a commit that already landed)."""
        keep: set[int] = set()
        lines = 0
        for entry in self._entries_backwards():
            keep.update((int(entry["live"]), int(entry.get("version", 0))))
            lines += 1
            if len(keep - {0}) >= self.retain or lines >= 4 * self.retain:
                break
        removed = []
        try:
            names = self.files.names(VERSIONS)
        except OSError as exc:
            LOG.warning("store %s: not compacted (%s)", self.root, describe(exc))
            return removed
        newest = max(keep, default=0)
        for name in names:
            stem = name[:-5]
            if not (name.endswith(".fire") and stem.isdigit() and int(stem) not in keep and int(stem) < newest):
                continue
            try:
                if self._built(name):
                    continue
                self.files.unlink(f"{VERSIONS}/{name}")
                removed.append(int(stem))
            except OSError as exc:
                LOG.warning("store %s: %s not compacted (%s)", self.root, name, describe(exc))
        self._remove_stale_tmp()
        if removed:
            LOG.info("store %s: compacted %d version files (keeping the newest %d)", self.root, len(removed),
                     self.retain)
        return removed

    def _built(self, name: str) -> bool:
        """Whether version file ``name`` was committed by ``fire repo build`` (its header says so): the repository's
        starting point, always kept for a rollback."""
        head, _ = self.files.read_tail(f"{VERSIONS}/{name}", HEADER_BYTES, HEADER_BYTES)
        try:
            return json.loads(head.partition(b"\n")[0]).get("action") == BUILD_ACTION
        except (ValueError, AttributeError):
            return False

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        for folder in ("", VERSIONS):
            try:
                names = self.files.names(folder, hidden=True)
            except OSError:
                continue
            for name in names:
                relative = f"{folder}/{name}" if folder else name
                with contextlib.suppress(OSError):
                    if name.startswith(TMP_PREFIX) and self.files.stat(relative).st_mtime < cutoff:
                        self.files.unlink(relative)

    # -- request nonces ---------------------------------------------------------------------
    def claim_nonce(self, nonce: str, ttl_s: float) -> bool:
        """Record a control request's nonce; False when it was already recorded (a replay, on any server following
        this store, before or after a restart). StoreError when it cannot be recorded (the store is missing,
        unreadable or full). Records older than ``ttl_s`` are pruned (at most once per ``ttl_s / 2``)."""
        name = f"{NONCES}/{hashlib.sha256(nonce.encode()).hexdigest()[:32]}"
        record = json.dumps({"time": time.time()}).encode()
        try:
            try:
                self.files.create(name, record)
            except FileNotFoundError:
                if self._root_problem() is not None:
                    raise
                self.files.mkdir(NONCES)  # a store written before nonces were kept here
                self.files.create(name, record)
        except FileExistsError:
            return False
        except OSError as exc:
            problem = self._root_problem() or f"{NONCES}/: {describe(exc)}"
            raise StoreError(f"the request's nonce cannot be recorded ({problem}); nothing was changed") from None
        if time.monotonic() - self._nonces_pruned >= ttl_s / 2:
            self._nonces_pruned = time.monotonic()
            self._prune_nonces(ttl_s)
        return True

    def _prune_nonces(self, ttl_s: float) -> None:
        cutoff = time.time() - ttl_s
        with contextlib.suppress(OSError):
            for name in self.files.names(NONCES):
                with contextlib.suppress(OSError):
                    if self.files.stat(f"{NONCES}/{name}").st_mtime < cutoff:
                        self.files.unlink(f"{NONCES}/{name}")

    # -- repair instances ------------------------------------------------------------------
    def follower(self, instance: str) -> InstanceFollower:
        """What repair instance ``instance`` follows the store with. It never creates the store; a crash's stale
        ``CURRENT`` is repaired and this host's stale instance entries pruned first, both best effort."""
        self.recover()
        try:
            for entry in self.registry.prune():
                LOG.info("store %s: removed the stale instance entry %s (pid %s)", self.root, entry.get("instance"),
                         entry.get("pid"))
        except OSError as exc:
            LOG.warning("store %s: stale instance entries not pruned (%s)", self.root, describe(exc))
        return InstanceFollower(self, instance)

    def instance_entries(self) -> list[dict]:
        """Every instance entry, each with ``alive``: True/False on this host, None for another host's."""
        return self.registry.entries()

    def instances(self) -> list[dict]:
        """The instances that run (on this host; every entry of other hosts), each with its applied version."""
        return self.registry.live()


#: seconds between the full checks a degraded follower makes whatever ``CURRENT``'s stamp says (``recheck``)
RECHECK_S = 1.0


class StoreFollower:
    """What a repair instance uses: notices a newly committed version with one ``stat`` per batch.

    ``poll()`` returns True when the version to apply changed; ``current`` is then the verified new version
    (None for version 0: no direction). It never raises: whatever the store looks like (missing, empty,
    unreadable, a link swapped in, a version that does not verify or does not fit), the instance keeps the
    version it verified, ``damage`` names what is wrong, and the next poll looks again.

    ``held`` is True until a first verified state was found (an instance that starts while the store is missing or
    damaged): the stage refuses requests meanwhile rather than serve without the committed defence. Version 0 is
    taken only when the history says so (a rollback to 0), or at start from a store nothing was ever committed to;
    a running instance never drops to 0 because a store looks new.
    """

    def __init__(self, store: DirectionStore) -> None:
        self.store = store
        self._stamp: tuple | None = None
        self.current: Version | None = None
        self.held = True
        self.damage: tuple[str, ...] = ()
        self.errors = 0  #: checks that failed unexpectedly (logged; the version in force stays)
        self._logged: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return self.current.number if self.current else 0

    @property
    def degraded(self) -> bool:
        return self.held or bool(self.damage)

    def poll(self) -> bool:
        try:
            try:
                st = os.stat(self.store.current_path, follow_symlinks=False)
                stamp: tuple = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
            except OSError as exc:
                stamp = ("error", exc.errno)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            return self._check()
        except Exception as exc:  # noqa: BLE001 - the serving path must never fail for the store
            self.errors += 1
            self._note((f"store check failed ({type(exc).__name__}: {exc})",))
            LOG.debug("store %s: check failed", self.store.root, exc_info=True)
            return False

    def recheck(self) -> bool:
        """A full check whatever ``CURRENT``'s stamp says (damage elsewhere leaves it unchanged)."""
        self._stamp = None
        return self.poll()

    def _note(self, damage: tuple[str, ...]) -> None:
        """Remember the damage seen; log it once when it changes (a poll per batch would flood the log)."""
        self.damage = damage
        if damage != self._logged:
            self._logged = damage
            if damage:
                LOG.error("store %s: %s; %s", self.store.root, "; ".join(damage), self._keeping())
            else:
                LOG.warning("store %s: healthy again; applying version %d", self.store.root, self.version)

    def _keeping(self) -> str:
        return "holding requests: no verified version yet" if self.held else f"keeping version {self.version}"

    def _check(self) -> bool:
        state, loaded = self.store._resolve()
        damage = list(state.damage)
        if state.verified is None:
            self._note(tuple(damage))
            return False
        if state.verified == 0:
            if state.pristine and (damage or not self.held):
                if not self.held and self.current is not None:
                    damage.append(f"the store looks new (nothing committed) while version {self.version} is applied")
                self._note(tuple(damage))
                return False
            self._note(tuple(damage))
            return self._take(None)
        if state.verified != state.version and not self.held:
            self._note(tuple(damage))  # the committed version is damaged: keep the one verified before
            return False
        self._note(tuple(damage))
        return self._take(loaded)

    def _take(self, version: Version | None) -> bool:
        was_held, self.held = self.held, False
        same = (version.number if version else 0) == self.version and \
            (version is None or self.current is None or version.sha256 == self.current.sha256)
        if same and not was_held:
            return False
        self.current = version
        return True


class InstanceFollower(StoreFollower):
    """A repair instance's follower: also knows when the version it holds was committed (``committed``: None for
    the version it started with, which was no propagation) and records in the instance registry what the
    instance applies (:meth:`report`, from the instance's watcher thread: never on the serving path)."""

    def __init__(self, store: DirectionStore, instance: str) -> None:
        super().__init__(store)
        self.instance = instance
        self.committed: float | None = None
        self.lag_s: float | None = None
        self._started = False
        self._reported: tuple | None = None

    def _take(self, version: Version | None) -> bool:
        changed = super()._take(version)
        if changed:
            sha = version.sha256 if version else ""
            self.committed = self.store.committed_at(self.version, sha) if self._started else None
            # seconds from the commit until applied here (clock skew between writers: never < 0)
            self.lag_s = None if self.committed is None else max(0.0, time.time() - self.committed)
            self._started = True
        return changed

    def report(self) -> bool:
        """Write the instance's registry entry if what it applies or sees changed; True when written. OSError when
        it cannot be written (the caller logs it and tries again later)."""
        state = (self.version, self.current.sha256 if self.current else "", self.held, self.damage)
        if state == self._reported:
            return False
        self.store.registry.report(self.instance, self.version, self.lag_s, held=self.held, degraded=self.degraded,
                                   damage=list(self.damage))
        self._reported = state
        return True

    def close(self) -> None:
        """Withdraw the instance from the registry (its model is unloading); best effort."""
        with contextlib.suppress(OSError):
            self.store.registry.withdraw(self.instance)
