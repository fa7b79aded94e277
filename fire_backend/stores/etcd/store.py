"""The direction store on etcd: the file store's guarantees (atomic, checksummed, ordered versions, an audit
history, rollback, no lost commit) carried across hosts, for several servers behind a load balancer.

Key layout under a prefix P (``etcd://host:port/P``; one prefix per deployment), values JSON unless noted:

    P/live                  {"version", "sha256", "size", "chunks", "seq", "next", "commit_id", "time"}: the commit
                            point.
                            Absent: version 0 (no direction), next version 1. It names everything a follower
                            needs to fetch and verify the payload
    P/versions/00000007     the manifest of version 7 ({"magic", "version", "sha256", "size", "chunks", ...});
                            written once
    P/history/0000000012    one audit entry per change (commit or rollback), sequence 12; written once
    P/blobs/<sha256>/0000   the payload (the file store's .npz bytes, layered, or one-layer in versions written
                            before: the manifest's magic says which, as a version file's header does) in chunks
                            of CHUNK bytes; content-addressed, so a retried or repeated payload reuses its chunks
    P/instances/<id>        what each repair instance applies and whether it reaches the engine; on a lease, so
                            a dead instance disappears after its TTL
    P/nonces/<hash>         a control request's nonce, claimed by a put-if-absent transaction before the action
                            runs (a replay finds it taken, on any replica); on a lease that outlives the
                            credential's time window

A commit writes the chunks first (nothing refers to them yet), then ONE transaction that compares ``P/live``'s
mod_revision with the one the writer read and only then creates ``versions/N`` and ``history/S`` and moves
``live``. etcd serialises transactions through raft, so two writers that read the same ``live`` never both create
version N: one transaction fails, and that writer re-reads. Each commit carries a random commit id into its
history entry: a write whose answer was lost (the engine died mid-reply) is looked up by it, so a retry never
commits twice and a landed commit is never reported as failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

from fire_backend.stores.damage import CHECKSUM, SHAPE, DamageListener
from fire_backend.stores.etcd.client import KV, EngineError, EngineUnavailable, EtcdClient
from fire_backend.stores.etcd.follower import READY_TIMEOUT_S, EtcdFollower
from fire_backend.stores.etcd.pointer import Pointer
from fire_backend.stores.format import (
    MAGIC_LAYERED,
    MAGICS,
    Conflict,
    DirectionSet,
    FitCheck,
    LayeredSet,
    LiveState,
    StoreError,
    StoreUnavailable,
    Version,
    committable,
)

LOG = logging.getLogger("fire_backend.store")

#: payload chunk size: under etcd's default 1.5 MiB request limit even base64-encoded
CHUNK = 512 * 1024
#: how long a commit keeps retrying while the engine is unreachable before it reports "outcome unknown"
COMMIT_DEADLINE_S = 10.0
#: how long a read waits out an unreachable engine before it reports it: a control action rides out an engine
#: restart or a short outage as its commit does
READ_WAIT_S = COMMIT_DEADLINE_S
#: how many earlier committed versions resolve() tries when the live one does not verify
FALLBACK_VERSIONS = 16


#: a commit's transaction: its history entry, the pointer it makes live, and keys it creates
Plan = tuple[dict[str, Any], Pointer, list[tuple[bytes, bytes]]]
R = TypeVar("R")


@contextlib.contextmanager
def engine_errors(what: str) -> Iterator[None]:
    """The client's errors as the store's: callers (the controller, the CLI) handle StoreError only."""
    try:
        yield
    except EngineUnavailable as exc:
        raise StoreUnavailable(f"{what}: the etcd store is unreachable ({exc})") from None
    except EngineError as exc:
        raise StoreError(f"{what}: etcd refused it ({exc})") from None


class EtcdStore:
    """The direction store under one etcd prefix; the same interface as the file engine's
    (:class:`fire_backend.stores.files.DirectionStore`).

    :meth:`locked` is optimistic here: it remembers the live version it started from, and a commit inside it
    raises :class:`Conflict` when another writer committed since (the caller runs the block again).
    """

    def __init__(self, client: EtcdClient, prefix: str, url: str = "", on_damage: DamageListener | None = None,
                 fits: FitCheck | None = None) -> None:
        if not prefix.strip("/"):
            raise ValueError("the etcd store needs a key prefix, e.g. etcd://127.0.0.1:2379/fire/prod")
        self.client = client
        self.prefix = ("/" + prefix.strip("/")).encode()
        self.url = url or f"etcd://{client.host}:{client.port}{self.prefix.decode()}"
        self.live_key = self.prefix + b"/live"
        self.read_wait_s = READ_WAIT_S
        self._section = threading.local()  # the Pointer a locked() block started from (per thread)
        self.conflicts = 0  # transactions lost to another writer
        self.resolved = 0  # commits whose answer was lost, found landed by their commit id
        self.on_damage = on_damage
        self.fits = fits
        self._damage_seen: set[tuple[str, int, str]] = set()
        self._nonce_lease: tuple[int, float] = (0, 0.0)  # (lease id, when granted: time.monotonic())

    def __repr__(self) -> str:
        return f"EtcdStore({self.url})"

    # -- keys -------------------------------------------------------------------------------
    def version_key(self, number: int) -> bytes:
        return self.prefix + b"/versions/%08d" % number

    def history_key(self, seq: int) -> bytes:
        return self.prefix + b"/history/%010d" % seq

    def blob_prefix(self, sha: str) -> bytes:
        return self.prefix + b"/blobs/" + sha.encode() + b"/"

    def instance_key(self, instance: str) -> bytes:
        return self.prefix + b"/instances/" + instance.encode()

    def nonce_key(self, nonce: str) -> bytes:
        """The key recording a control request's nonce (hashed: any text makes a safe key of fixed length)."""
        return self.prefix + b"/nonces/" + hashlib.sha256(nonce.encode()).hexdigest()[:32].encode()

    # -- reads ------------------------------------------------------------------------------
    def _read(self, what: str, read: Callable[[], R], wait_s: float | None = None) -> R:
        """``read()``, waiting out an outage of up to ``wait_s`` (default ``read_wait_s``: a control action spans an
        engine restart)."""
        give_up = time.monotonic() + (self.read_wait_s if wait_s is None else wait_s)
        while True:
            try:
                with engine_errors(what):
                    return read()
            except StoreUnavailable:
                if time.monotonic() >= give_up:
                    raise
                time.sleep(0.1)

    def pointer(self) -> Pointer:
        """``P/live`` now (a linearizable read)."""
        return self._read("read the live version", self._raw_pointer)

    def history(self) -> list[dict]:
        kvs = self._read("read the history", lambda: self.client.get_prefix(self.prefix + b"/history/"))
        return [json.loads(kv.value) for kv in kvs]

    def claim_nonce(self, nonce: str, ttl_s: float) -> bool:
        """Record a control request's nonce (one put-if-absent transaction); False when it was already recorded (a
        replay, on any replica). An answer lost mid-request is settled by reading the key back: the claim carries
        an id of its own, so a retry never mistakes its own claim for a replay."""
        key, claim = self.nonce_key(nonce), uuid.uuid4().hex
        record = json.dumps({"time": time.time(), "claim": claim}).encode()

        def attempt() -> bool:
            try:
                ok, _ = self.client.txn([self.client.cmp_absent(key)],
                                        [self.client.op_put(key, record, self._lease_for(ttl_s))], [])
            except EngineUnavailable:
                kv, _ = self.client.get(key)  # did it land before the answer was lost?
                if kv is None:
                    raise
                ok = json.loads(kv.value).get("claim") == claim
            if not ok:
                kv, _ = self.client.get(key)
                ok = kv is not None and json.loads(kv.value).get("claim") == claim
            return ok

        return self._read("record the request's nonce", attempt)

    def _lease_for(self, ttl_s: float) -> int:
        """A lease the nonce keys of the next ``ttl_s / 2`` seconds share, granted for ``1.5 x ttl_s``: each key lives
        at least ``ttl_s``, and one grant serves many requests."""
        lease, granted = self._nonce_lease
        if not lease or time.monotonic() - granted >= ttl_s / 2:
            lease = self.client.lease_grant(math.ceil(1.5 * ttl_s))
            self._nonce_lease = (lease, time.monotonic())
        return lease

    def read_version(self, number: int) -> Version:
        """Load and verify one version; StoreError if it is missing, partial or corrupt."""
        kv, _ = self._read(f"read version {number}", lambda: self.client.get(self.version_key(number)))
        if kv is None:
            raise StoreError(f"version {number} does not exist")
        try:
            manifest = json.loads(kv.value)
            sha, size, chunks = str(manifest["sha256"]), int(manifest["size"]), int(manifest["chunks"])
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"version {number}: unreadable manifest") from None
        if manifest.get("magic") not in MAGICS or manifest.get("version") != number:
            raise StoreError(f"version {number}: not a direction-set manifest")
        return self.fetch(replace(Pointer(), version=number, sha256=sha, size=size, chunks=chunks), manifest)

    def verified_version(self, number: int, sha256: str = "") -> Version:
        version = self.read_version(number)
        if sha256 and version.sha256 != sha256:
            raise StoreError(f"version {number}: its checksum differs from the committed one; not served")
        return version

    def fetch(self, pointer: Pointer, header: dict | None = None, wait_s: float | None = None) -> Version:
        """The payload ``pointer`` names, verified against it (size, chunk count, SHA-256) and decoded."""
        number = pointer.version
        chunks = self._read(f"read version {number}", lambda: self.client.get_prefix(self.blob_prefix(pointer.sha256)),
                            wait_s)
        payload = b"".join(c.value for c in chunks)
        if len(chunks) != pointer.chunks or len(payload) != pointer.size \
                or hashlib.sha256(payload).hexdigest() != pointer.sha256:
            self._damaged(number, pointer.sha256)
            raise StoreError(f"version {number}: payload missing or checksum mismatch (partial or corrupt); "
                             "not served")
        try:
            layered = LayeredSet.from_bytes(payload)
        except (ValueError, KeyError, OSError) as exc:
            self._damaged(number, pointer.sha256)
            raise StoreError(f"version {number}: unreadable payload ({exc})") from None
        if self.fits is not None:
            try:
                self.fits(layered)
            except ValueError as exc:
                self._damaged(number, pointer.sha256, SHAPE)
                raise StoreError(f"version {number} does not fit the served network ({exc}); not served") from None
        return Version(number, pointer.sha256, layered, header or {"version": number, "sha256": pointer.sha256})

    def _damaged(self, number: int, sha256: str, kind: str = CHECKSUM) -> None:
        """Tell ``on_damage`` of a version that does not verify, once per version, checksum and kind."""
        if self.on_damage is not None and (kind, number, sha256) not in self._damage_seen:
            self._damage_seen.add((kind, number, sha256))
            self.on_damage(kind)

    def resolve(self) -> LiveState:
        """What is committed and what of it verifies (an earlier committed version when the live one does not)."""
        pointer = self.pointer()
        damage: list[str] = []
        if self._verifies(pointer, damage):
            return LiveState(pointer.version, pointer.sha256, pointer.version, pristine=not pointer.mod_revision)
        candidates = [(int(e["live"]), str(e.get("sha256", ""))) for e in reversed(self.history())]
        tried: set[int] = {pointer.version}
        for number, sha in candidates:
            if len(tried) > FALLBACK_VERSIONS:
                break
            if number in tried:
                continue
            tried.add(number)
            if self._verifies(replace(Pointer(), version=number, sha256=sha), None, full=True):
                return LiveState(pointer.version, pointer.sha256, number, tuple(damage))
        return LiveState(pointer.version, pointer.sha256, None, (*damage, "no committed version verifies"))

    def _verifies(self, pointer: Pointer, damage: list[str] | None, full: bool = False) -> bool:
        if pointer.version == 0:
            return True
        try:
            if full:
                self.verified_version(pointer.version, pointer.sha256)
            else:
                self.fetch(pointer)
        except StoreUnavailable:
            raise
        except StoreError as exc:
            if damage is not None:
                damage.append(str(exc))
            return False
        return True

    # -- writers ----------------------------------------------------------------------------
    def initialize(self) -> None:
        """Nothing to create (an absent ``live`` is version 0); checks that the engine answers, naming the fix."""
        self.pointer()

    def recover(self) -> None:
        """Nothing to finish: a transaction commits whole."""

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """A read-derive-commit block, run optimistically: commits in it raise Conflict if another writer got in
        first. Re-entrant on one thread."""
        if getattr(self._section, "pointer", None) is not None:
            yield
            return
        self._section.pointer = self.pointer()
        try:
            yield
        finally:
            self._section.pointer = None

    def commit(self, directions: DirectionSet | LayeredSet, action: str, actor: str = "local",
               note: dict | None = None) -> int:
        """Write a new version and make it live (one set, or every layer's under one number); returns its number.

        Inside :meth:`locked` it commits only on top of the version the block read (else Conflict); outside, on
        top of whatever is live. Retries while the engine is unreachable, up to COMMIT_DEADLINE_S.
        """
        payload = committable(directions, self.fits).to_bytes()
        sha = hashlib.sha256(payload).hexdigest()
        chunks = max(1, -(-len(payload) // CHUNK))
        commit_id = uuid.uuid4().hex

        def plan(base: Pointer) -> Plan:
            number = base.next
            manifest = {"magic": MAGIC_LAYERED, "version": number, "sha256": sha, "size": len(payload),
                        "chunks": chunks, "action": action, "actor": actor, "time": time.time(), "commit_id": commit_id}
            entry = {"action": action, "version": number, "live": number, "sha256": sha, "actor": actor,
                     "commit_id": commit_id, **(note or {})}
            live = Pointer(number, sha, base.seq + 1, number + 1, commit_id, 0, len(payload), chunks)
            return entry, live, [(self.version_key(number), json.dumps(manifest).encode())]

        def write_chunks() -> None:
            for index in range(chunks):
                self.client.put(self.blob_prefix(sha) + b"%04d" % index, payload[index * CHUNK:(index + 1) * CHUNK])

        return self._transact(commit_id, plan, write_chunks).version

    def rollback(self, number: int, actor: str = "local", note: dict | None = None) -> int:
        """Make an earlier committed version live again (it keeps its number); a missing or corrupt one is refused."""
        committed = {int(e["version"]) for e in self.history() if e.get("action") != "rollback"}
        if number != 0 and number not in committed:
            raise StoreError(f"version {number} was never committed; see `fire ctl history`")
        target = self.read_version(number) if number else None
        sha = target.sha256 if target else ""
        size = int(target.header["size"]) if target else 0
        chunks = int(target.header["chunks"]) if target else 0
        commit_id = uuid.uuid4().hex

        def plan(base: Pointer) -> Plan:
            entry = {"action": "rollback", "version": number, "live": number, "sha256": sha, "actor": actor,
                     "commit_id": commit_id, **(note or {})}
            return entry, Pointer(number, sha, base.seq + 1, base.next, commit_id, 0, size, chunks), []

        self._transact(commit_id, plan)
        return number

    def _transact(self, commit_id: str, plan: Callable[[Pointer], Plan],
                  prepare: Callable[[], None] | None = None) -> Pointer:
        """Run the compare-and-set ``plan(base)`` until it lands or is refused; an ambiguous answer (the engine went
        away mid-request) is settled by looking for ``commit_id`` in the history, so nothing commits twice.

        In a :meth:`locked` block ``base`` is the block's pointer and a lost race raises Conflict; outside, a lost
        race re-reads ``live`` and tries again. Returns the pointer the commit made live.
        """
        section = getattr(self._section, "pointer", None)
        base, planned = section, None
        give_up = time.monotonic() + COMMIT_DEADLINE_S
        while True:
            try:
                if prepare is not None:
                    prepare()
                    prepare = None
                if base is None:
                    base = self._raw_pointer()
                planned = plan(base)
                try:
                    landed = self._switch(base, *planned)
                except Conflict:
                    landed = self._find_commit(commit_id, base.seq, planned[1])
                    if landed is None:
                        if section is not None:
                            raise
                        base = None
                        continue
            except EngineError as exc:
                raise StoreError(f"etcd refused the commit ({exc})") from None
            except EngineUnavailable as exc:
                if time.monotonic() > give_up:
                    raise StoreUnavailable(
                        f"the etcd store is unreachable ({exc}); the outcome is unknown: look for commit id "
                        f"{commit_id} in `fire ctl history` before trying again") from None
                time.sleep(0.1)
                if base is None or planned is None:
                    continue
                try:
                    landed = self._find_commit(commit_id, base.seq, planned[1])
                except EngineUnavailable:
                    continue
                if landed is None:
                    base = section
                    continue
            if section is not None:
                self._section.pointer = landed
            return landed

    def _raw_pointer(self) -> Pointer:
        kv, _ = self.client.get(self.live_key)
        return self.parse(kv)

    @staticmethod
    def parse(kv: KV | None) -> Pointer:
        """The pointer a read or watch event of ``P/live`` carries (None: never written)."""
        return Pointer.parse(kv.value if kv else None, kv.mod_revision if kv else 0)

    def _switch(self, base: Pointer, entry: dict[str, Any], live: Pointer, extra: list[tuple[bytes, bytes]]) -> Pointer:
        """The compare-and-set: move ``live`` iff nobody committed since ``base`` was read."""
        c = self.client
        seq = base.seq + 1
        compare = [c.cmp_mod_revision(self.live_key, base.mod_revision) if base.mod_revision
                   else c.cmp_absent(self.live_key), c.cmp_absent(self.history_key(seq))]
        compare += [c.cmp_absent(key) for key, _ in extra]
        entry = {**entry, "seq": seq, "time": time.time()}
        live = replace(live, time=entry["time"])  # the commit time, for the followers' propagation lag
        success = [c.op_put(key, value) for key, value in extra]
        success += [c.op_put(self.history_key(seq), json.dumps(entry, sort_keys=True).encode()),
                    c.op_put(self.live_key, live.record())]
        ok, answer = c.txn(compare, success, [])
        if not ok:
            self.conflicts += 1
            raise Conflict(f"another writer committed since revision {base.mod_revision}; re-read and try again")
        return replace(live, mod_revision=int(answer["header"]["revision"]))

    def _find_commit(self, commit_id: str, since_seq: int, planned: Pointer) -> Pointer | None:
        """The pointer a commit with this id made live, if it landed (the outcome of an ambiguous write).

        Its history entry was written by the same transaction as ``live``, so it carries that transaction's
        revision; the number is the entry's (a blind retry may have planned another one).
        """
        for kv in self.client.get_prefix(self.prefix + b"/history/", start=self.history_key(since_seq + 1)):
            entry = json.loads(kv.value)
            if entry.get("commit_id") == commit_id:
                self.resolved += 1
                return replace(planned, version=int(entry["live"]), seq=int(entry["seq"]),
                               mod_revision=kv.mod_revision, time=float(entry.get("time", 0.0)))
        return None

    # -- repair instances -------------------------------------------------------------------
    def follower(self, instance: str) -> EtcdFollower:
        """A started follower thread for repair instance ``instance``, after its first verified read, or after
        READY_TIMEOUT_S without one (the engine away): the instance then holds requests while the thread retries."""
        follower = EtcdFollower(self, instance)
        follower.start()
        if not follower.wait_ready():
            LOG.warning("%s: no verified version from %s in %g s (%s); holding requests until there is one",
                        instance, self.url, READY_TIMEOUT_S, follower.last_error)
        return follower

    def report_instance(self, instance: str, record: dict[str, Any], lease: int) -> None:
        self.client.put(self.instance_key(instance), json.dumps(record).encode(), lease=lease)

    def instances(self) -> list[dict]:
        kvs = self._read("list the instances", lambda: self.client.get_prefix(self.prefix + b"/instances/"))
        return [json.loads(kv.value) for kv in kvs]

    def instance_entries(self) -> list[dict]:
        """The instance records, each ``alive``: a record lives on its instance's lease, so a listed one runs."""
        return [{**record, "alive": True} for record in self.instances()]

    def committed_at(self, number: int, sha256: str = "") -> float | None:
        """When ``number`` (with ``sha256``, when given) last became live: the time of its newest history entry."""
        for entry in reversed(self.history()):
            if entry.get("live") == number and (not sha256 or entry.get("sha256", "") == sha256):
                time_ = entry.get("time")
                return float(time_) if isinstance(time_, (int, float)) else None
        return None
