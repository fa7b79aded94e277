"""The store's live direction version as a :class:`~fire_backend.fire.RepairPlan` on one instance's device.

Every stage that repairs (``fused``, the ``inline`` head, the ``separate`` repair stage) holds one. Before each
batch, never within one, :meth:`LivePlan.refresh` asks the store follower whether a new version was committed
(one ``stat``); if so the version is verified, compiled onto the device for every configured layer, and used from
that batch on, and the instance reports what it applies (in the store's registry and on /metrics). No model
reload is involved.

An instance that gets no traffic would never look, and would report an old version forever (``fire ctl status``
and the FireInstanceBehindLiveVersion alert would call it behind). So a watcher thread makes the same check
every :data:`WATCH_INTERVAL_S` while the stage is idle; one lock keeps it and the serving path from applying at
once, uncontended on the serving path except in the microseconds the watcher holds it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from fire_backend.fire import RepairPlan, compile_plan
from fire_backend.serving.artifacts import STORE_DIR, ServingSettings
from fire_backend.serving.metrics import BatchMetrics
from fire_backend.store import DirectionStore, StoreFollower, Version

LOG = logging.getLogger("fire_backend.serving")

#: seconds between an idle instance's checks of the store: the propagation target without traffic
WATCH_INTERVAL_S = 0.5


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

    ``metrics`` (the stage's) hears the applied version, its propagation lag and the store damage met.
    """

    def __init__(self, artifacts: Path, settings: ServingSettings, device: torch.device, instance: str,
                 metrics: BatchMetrics | None = None, watch_interval_s: float = WATCH_INTERVAL_S) -> None:
        self.settings = settings
        self.device = device
        self.metrics = metrics
        self.store = DirectionStore(artifacts / STORE_DIR, metrics.store_error if metrics else None).ensure()
        self.store.repair_pointer()
        self.follower = StoreFollower(self.store)
        self.instance_id = f"{instance}-{os.getpid()}".replace("/", "_").replace(" ", "_")
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self.follower.poll()
        self.plan = RepairPlan({}, 0)
        self._apply(start=True)  # reports the start version too, version 0 included
        self._stop = threading.Event()
        self._interval = watch_interval_s
        self._watcher = threading.Thread(target=self._watch, name=f"fire-watch-{self.instance_id}", daemon=True)
        self._watcher.start()

    def refresh(self) -> RepairPlan:
        """The plan to apply to the next batch (re-compiled only when the live version changed)."""
        with self._lock:
            self._busy_until = time.monotonic() + self._interval
            if self.follower.poll():
                self._apply()
            return self.plan

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                if time.monotonic() >= self._busy_until and self.follower.poll():  # idle: no batch checks
                    self._apply()

    def _apply(self, start: bool = False) -> None:
        """Compile and use the follower's version; report it (the lag only for a propagation, not at start).

        Reported before the new plan is swapped in, so that whoever sees the plan also sees the report."""
        current = self.follower.current
        number = self.follower.version
        plan = plan_of(current, self.settings, self.device)
        committed = None if start else self.store.committed_at(number, current.sha256 if current else "")
        lag = None if committed is None else max(0.0, time.time() - committed)
        self.store.report_instance(self.instance_id, number, lag)
        if self.metrics is not None:
            self.metrics.applied(number, committed)
        self.plan = plan
        LOG.info("%s: applying direction version %d", self.instance_id, number)

    def close(self) -> None:
        """Stop watching and withdraw this instance from the store's registry (the model is unloading)."""
        self._stop.set()
        self._watcher.join(timeout=5.0)
        path = self.store.instances_dir / f"{self.instance_id}.json"
        path.unlink(missing_ok=True)
