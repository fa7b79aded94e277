"""What a repair instance runs on the etcd store: a thread that keeps the last verified live version in memory.

Inference never waits on the engine: a stage calls :meth:`EtcdFollower.poll` before each batch (an attribute
comparison, no I/O) and the thread swaps ``current`` once a newly committed version has been fetched, checked
against the SHA-256 that ``live`` names, and decoded.

Protocol: read ``P/live`` (linearizable) at store revision R and apply it, then watch ``P/live`` from R + 1.
Changes arrive in revision order and are applied only forwards; a broken stream is reopened after a fresh read
(a follower serves the latest committed version, not every one, so a compacted revision costs nothing). After
IDLE_S of silence one linearizable read checks that the engine is still there and that nothing was missed (a
partitioned member neither sends nor closes). While the engine is unreachable the last verified version stays
in force; the outage is logged once, shown by :meth:`status`, and written to the instance record on return.

The instance record carries ``lag_s``: seconds from the version's commit (the time ``P/live`` records) until it
was verified here; None for the version the instance started with. The thread only swaps ``current``: the stage
(its batches, or its live plan's idle watcher) compiles and applies it, so no device work or metric update ever
runs here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Protocol

from fire_backend.procfs import this_host
from fire_backend.stores.etcd.client import IDLE, KV, EngineError, EngineUnavailable, EtcdClient, WatchCompacted
from fire_backend.stores.etcd.pointer import Pointer
from fire_backend.stores.format import LiveState, StoreError, StoreUnavailable, Version

LOG = logging.getLogger("fire_backend.store")
#: seconds without a watch event before a liveness read
IDLE_S = 1.0
#: how long a starting instance waits for its first verified read before it loads holding requests (fail closed:
#: no direction is ever served unverified; its thread keeps trying)
READY_TIMEOUT_S = 5.0
#: the instance record's lease: a killed instance disappears from `status` after this long
LEASE_TTL_S = 10
BACKOFF_S = (0.05, 0.2)


class FollowedStore(Protocol):
    """What the follower uses of :class:`fire_backend.stores.etcd.store.EtcdStore` (which creates followers)."""

    client: EtcdClient
    url: str
    live_key: bytes

    def parse(self, kv: KV | None) -> Pointer: ...

    def fetch(self, pointer: Pointer, header: dict | None = None, wait_s: float | None = None) -> Version: ...

    def resolve(self) -> LiveState: ...

    def verified_version(self, number: int, sha256: str = "") -> Version: ...

    def report_instance(self, instance: str, record: dict[str, Any], lease: int) -> None: ...


class EtcdFollower(threading.Thread):
    """Follows ``P/live`` for one repair instance; ``current`` is the verified version (None: version 0)."""

    def __init__(self, store: FollowedStore, instance: str, idle: float = IDLE_S, lease_ttl: int = LEASE_TTL_S) -> None:
        super().__init__(name=f"fire-follower-{instance}", daemon=True)
        self.store, self.instance, self.idle, self.lease_ttl = store, instance, idle, lease_ttl
        self.current: Version | None = None  # replaced whole: readers need no lock
        self.held = True  # no verified version yet: the stage refuses requests
        self._refusal = ""  # why the newest committed version was not applied
        self._applied_at = 0.0
        self.committed: float | None = None  # the commit time of ``current`` (None: the version it started with)
        self._polled: Version | None = None
        self._seen_revision = 0
        self._refused: tuple[int, str] | None = None
        self._lease = 0
        self._halt = threading.Event()
        self._changed = threading.Event()  # wakes the reporter: the instance record is out of date
        self.ready = threading.Event()  # set after the first successful read of live
        self.down_since: float | None = time.time()
        self.last_error = "not connected yet"
        self.outages = 0

    @property
    def version(self) -> int:
        return self.current.number if self.current else 0

    @property
    def damage(self) -> tuple[str, ...]:
        """What is wrong as this instance sees it: the engine away, or a committed version it refused."""
        problems = []
        if self.down_since is not None:
            problems.append(f"etcd store unreachable ({self.last_error})")
        if self._refusal:
            problems.append(self._refusal)
        return tuple(problems)

    @property
    def degraded(self) -> bool:
        return self.held or bool(self.damage)

    def recheck(self) -> bool:
        """The watch thread keeps looking by itself: the same as :meth:`poll`."""
        return self.poll()

    def report(self) -> bool:
        """The instance record is written by this follower's own reporter thread (nothing to do here)."""
        return False

    def poll(self) -> bool:
        """True when ``current`` changed since the last poll (the stage recompiles its plan)."""
        current = self.current
        if current is self._polled:
            return False
        self._polled = current
        return True

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Block until the first verified read, at most ``timeout`` seconds; False when there is none yet (the
        instance then holds requests while this thread keeps trying)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.wait(max(0.0, min(0.05, deadline - time.monotonic()))) and not self.held:
                return True
        return not self.held

    def status(self) -> dict[str, Any]:
        lag = None if self.committed is None else max(0.0, self._applied_at - self.committed)  # clock skew: >= 0
        return {"instance": self.instance, "version": self.version, "lag_s": lag, "held": self.held,
                "degraded": self.degraded, "damage": list(self.damage), "engine_reachable": self.down_since is None,
                "down_since": self.down_since, "last_error": self.last_error if self.down_since else "",
                "outages": self.outages, "pid": os.getpid(), "host": this_host(), "time": time.time()}

    def close(self) -> None:
        """Stop following and withdraw the instance record (best effort: its lease expires anyway)."""
        self._halt.set()
        self._changed.set()
        lease, self._lease = self._lease, 0
        if lease:
            try:
                self.store.client.lease_revoke(lease)
            except (EngineUnavailable, EngineError) as exc:
                LOG.debug("%s: lease not revoked (%s); it expires in %d s", self.instance, exc, self.lease_ttl)

    # -- applying -----------------------------------------------------------------------------------
    def _consider(self, pointer: Pointer) -> None:
        """Apply ``pointer`` if it is newer than what was seen and its payload verifies."""
        seen = self._seen_revision
        if pointer.mod_revision and pointer.mod_revision <= seen:
            return
        self._seen_revision = max(seen, pointer.mod_revision)
        if not self.held and pointer.version == self.version \
                and (self.current is None or self.current.sha256 == pointer.sha256):
            self._refusal = ""
            return
        if not pointer.mod_revision and not self.held and self.current is not None:
            # ``live`` absent: a store nothing was ever committed to. One that applied a version never drops to 0.
            self._refusal = (f"the store looks new (nothing committed) while version {self.version} is applied; "
                             "not applied")
            return
        if self._refused == (pointer.version, pointer.sha256):
            return
        try:
            version = self.store.fetch(pointer, wait_s=0) if pointer.version else None
        except StoreUnavailable:
            self._seen_revision = seen  # not refused, just not fetched: the next read applies it
            raise
        except StoreError as exc:  # corrupt, missing or not fitting: never served; the previous version stays
            self._refused = (pointer.version, pointer.sha256)
            self._refusal = str(exc)
            LOG.error("%s: %s; %s", self.instance, exc,
                      "holding requests" if self.held else f"keeping version {self.version}")
            if not self.held:
                return
            version = self._fallback()
            if version is None:
                return
        else:
            self._refusal = ""
        self.committed = (pointer.time or None) if self.ready.is_set() else None
        self._applied_at = time.time()
        self.current = version
        self.held = False
        LOG.info("%s: direction version %d verified", self.instance, self.version)
        self._changed.set()

    def _fallback(self) -> Version | None:
        """At start, when the live version does not verify: the newest earlier one that does (as the file store);
        None when none does (the instance keeps holding requests: never version 0 by way of damage)."""
        state = self.store.resolve()
        if not state.verified:
            LOG.error("%s: no committed version verifies; holding requests", self.instance)
            return None
        return self.store.verified_version(state.verified)

    def _read_live(self) -> int:
        kv, revision = self.store.client.get(self.store.live_key)
        self._consider(self.store.parse(kv))
        return revision

    # -- engine health and the instance record -------------------------------------------------------
    def _up(self) -> None:
        if self.down_since is not None:
            if self.outages:
                LOG.warning("%s: etcd store reachable again after %.2f s; applying version %d", self.instance,
                            time.time() - self.down_since, self.version)
            self.down_since = None
            self.ready.set()
            self._changed.set()

    def _down(self, exc: Exception) -> None:
        self.last_error = str(exc)
        if self.down_since is None:
            self.down_since = time.time()
            self.outages += 1
            LOG.warning("%s: etcd store unreachable (%s); serving verified version %d until it returns",
                        self.instance, exc, self.version)

    def _report(self) -> None:
        """Its own thread, so a slow or absent engine never delays noticing or applying a version."""
        while not self._halt.is_set():
            changed = self._changed.wait(self.lease_ttl / 3)
            self._changed.clear()
            if self._halt.is_set() or self.down_since is not None:
                continue
            try:
                if self._lease and self.store.client.lease_keepalive(self._lease) <= 0:
                    self._lease = 0  # expired while the engine was away: the record went with it
                if not self._lease:
                    self._lease = self.store.client.lease_grant(self.lease_ttl)
                    changed = True
                if changed:
                    self.store.report_instance(self.instance, self.status(), self._lease)
            except (EngineUnavailable, EngineError) as exc:
                LOG.debug("%s: instance record not written: %s", self.instance, exc)
            except Exception:  # noqa: BLE001 - a dead reporter would freeze what status shows of this instance
                LOG.exception("%s: instance record not written", self.instance)
                self._halt.wait(1.0)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        threading.Thread(target=self._report, name=f"{self.name}-report", daemon=True).start()
        backoff = BACKOFF_S[0]
        while not self._halt.is_set():
            try:
                revision = self._read_live()
                self._up()
                backoff = BACKOFF_S[0]
                for event in self.store.client.watch(self.store.live_key, revision + 1, idle=self.idle):
                    if self._halt.is_set():
                        return
                    if event is IDLE:
                        self._read_live()  # liveness probe; also catches anything missed
                        continue
                    for kv in event.kvs:
                        self._consider(self.store.parse(kv))
            except WatchCompacted:
                continue
            except (EngineUnavailable, EngineError, StoreUnavailable) as exc:
                self._down(exc)
                self._halt.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
            except Exception as exc:  # noqa: BLE001 - a dead follower would freeze a stale version silently
                LOG.exception("%s: follower error", self.instance)
                self._down(exc)
                self._halt.wait(0.5)
