"""The store's live direction version as a :class:`~fire_backend.fire.RepairPlan` on one instance's device.

Every stage that repairs (``fused``, the ``inline`` head, the ``separate`` repair stage) holds one. Before each
batch, never within one, :meth:`LivePlan.refresh` asks the store follower whether a new version was committed
(the file store: one ``stat``; etcd: an attribute its watch thread sets); if so the verified version is compiled
onto the device for every configured layer and used from that batch on. No model reload is involved.

The serving path only reads: it never writes to disk and never raises for the store. Whatever the store looks
like (missing, unreadable, damaged, a version that does not fit, an engine away), the instance keeps the plan it
verified, and says so on /metrics (``fire_store_degraded``). An instance that has never verified a version (it
started while the store was missing or unreachable) has no plan: ``refresh()`` returns None and the stage refuses
requests (``fire_repair_unavailable``; ``fire serve``'s ``/ready`` is 503) until one verifies.

A watcher thread per instance does the rest, off the serving path, and never dies (it logs, counts, backs off and
goes on): every :data:`WATCH_INTERVAL_S` while the stage is idle it makes the batch's check (an instance that gets
no traffic would otherwise report an old version forever); while the store is degraded it looks again in full
every :data:`~fire_backend.stores.files.RECHECK_S` (damage that leaves ``CURRENT`` alone changes no stamp), so the
instance recovers without a restart once the fault is gone; and it records what the instance applies in the
instance registry (``fire ctl status``), where a failed write (a full disk) is logged and tried again. One lock
keeps it and the serving path from applying at once, uncontended on the serving path except in the microseconds
the watcher holds it. With etcd the follower's watch thread has by then fetched and verified the version, so the
checks are attribute comparisons; it never compiles in the follower's thread, so nothing but the serving path and
the watcher ever touches the stage's device or metrics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from fire_backend.fire import RepairPlan, compile_plan
from fire_backend.repository.layout import ServingSettings, repository_store
from fire_backend.stores.files import RECHECK_S
from fire_backend.stores.format import Version
from fire_backend.stub.metrics import BatchMetrics

LOG = logging.getLogger("fire_backend.stub")

#: seconds between an idle instance's checks of the store: the propagation target without traffic
WATCH_INTERVAL_S = 0.5
#: the longest pause of a watcher after repeated failures (its own, or writing the instance record)
MAX_BACKOFF_S = 30.0


def plan_of(version: Version | None, settings: ServingSettings, device: torch.device) -> RepairPlan:
    """Compile a store version for the repository's repaired layers (version 0: nothing to repair).

    A version holds a direction set per layer (one written in the one-layer format applies at the split layer
    ``settings.layer``); a configured layer without a direction in the version is not repaired.
    """
    if version is None:
        return RepairPlan({}, 0)
    layered = version.layered.at(settings.layer)
    sets = {layer: (ds.directions, torch.from_numpy(ds.center)) for layer, ds in layered.items()}
    return compile_plan(sets, settings.layer_dims, device, version.number)


class LivePlan:
    """Follows the direction store for one instance and keeps its compiled plan current.

    ``metrics`` (the stage's) hears the applied version, its propagation lag, the store damage met and whether the
    store is degraded or the instance unavailable.
    """

    def __init__(self, artifacts: Path, settings: ServingSettings, device: torch.device, instance: str,
                 metrics: BatchMetrics | None = None, watch_interval_s: float = WATCH_INTERVAL_S) -> None:
        self.settings = settings
        self.device = device
        self.metrics = metrics
        self.instance_id = f"{instance}-{os.getpid()}".replace("/", "_").replace(" ", "_")
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self._interval = watch_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.plan: RepairPlan | None = None
        self.failures = 0  #: watcher rounds that failed (logged; the watcher goes on)
        self._state_sent: tuple[bool, bool] | None = None
        store = repository_store(artifacts, settings, metrics.store_error if metrics else None)
        self.follower = store.follower(self.instance_id)
        with self._lock:
            self.follower.poll()
            self._poll(True)  # applies and reports the start version, 0 included (unless held)
        self._watcher = threading.Thread(target=self._watch, name=f"fire-watch-{self.instance_id}", daemon=True)
        self._watcher.start()

    @property
    def held(self) -> bool:
        """No verified version yet: the stage refuses requests."""
        return self.plan is None

    def refresh(self) -> RepairPlan | None:
        """The plan to apply to the next batch (re-compiled only when the live version changed); None while no
        version was ever verified. Never raises."""
        with self._lock:
            self._busy_until = time.monotonic() + self._interval
            self._poll(self.follower.poll())
            return self.plan

    def _poll(self, changed: bool) -> None:
        """Apply the follower's version if it changed; tell the metrics what the instance sees of the store."""
        if changed and not self.follower.held:
            self._apply()
        state = (self.follower.degraded, self.plan is None)
        if state != self._state_sent and self.metrics is not None:
            self.metrics.store_state(*state)
            self._state_sent = state
            self._wake.set()

    def _apply(self) -> None:
        """Compile and use the follower's version; report it (the lag only for a propagation, not at start).

        Reported to the metrics before the new plan is swapped in, so that whoever sees the plan also sees the
        report. A version that does not compile (it passed the store's checks, so this is a bug) keeps the plan in
        force and is logged."""
        number = self.follower.version
        try:
            plan = plan_of(self.follower.current, self.settings, self.device)
        except Exception:  # noqa: BLE001 - never fail the serving path: keep what was verified before
            self.failures += 1
            LOG.exception("%s: direction version %d does not compile; keeping version %d", self.instance_id, number,
                          self.plan.version if self.plan else 0)
            return
        if self.metrics is not None:
            self.metrics.applied(number, self.follower.committed)
        self.plan = plan
        self._wake.set()  # the watcher records it in the instance registry at once
        LOG.info("%s: applying direction version %d", self.instance_id, number)

    def _watch(self) -> None:
        next_recheck = next_report = 0.0
        check_backoff = report_backoff = 0.0
        while not self._stop.is_set():
            self._wake.wait(max(self._interval, check_backoff))
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            try:
                with self._lock:
                    if now >= self._busy_until:  # idle: no batch checks
                        self._poll(self.follower.poll())
                    if self.follower.degraded and now >= next_recheck:
                        next_recheck = now + (self._interval if self.follower.held else RECHECK_S)
                        self._poll(self.follower.recheck())
                check_backoff = 0.0
            except Exception as exc:  # noqa: BLE001 - a dead watcher would freeze the instance's view of the store
                self.failures += 1
                check_backoff = min(max(2 * check_backoff, 1.0), MAX_BACKOFF_S)
                LOG.warning("%s: store check failed (%s: %s); next in %.0f s", self.instance_id, type(exc).__name__,
                            exc, check_backoff)
            if now >= next_report:
                try:
                    self.follower.report()
                    report_backoff = 0.0
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the record waits, serving goes on
                    self.failures += 1
                    report_backoff = min(max(2 * report_backoff, 1.0), MAX_BACKOFF_S)
                    next_report = now + report_backoff
                    LOG.warning("%s: instance record not written (%s: %s); next try in %.0f s", self.instance_id,
                                type(exc).__name__, exc, report_backoff)

    def close(self) -> None:
        """Stop following and withdraw this instance from the store's records (the model is unloading)."""
        self._stop.set()
        self._wake.set()
        self._watcher.join(timeout=5.0)
        self.follower.close()
